"""Asynchronous gossip (``strategy.kind: gossip``, ``strategy.algorithm: async_push_sum``): a
rank that falls behind slows nobody; between epoch ends no rank waits for another.

Algorithm: asynchronous gradient-push (Assran & Rabbat 2021, "Asynchronous Gradient-Push", IEEE
TAC; the math is in :mod:`sparkml_dist.algo.gossip`). Every rank holds a push-sum numerator
``x`` and weight ``w`` (the shared initial model and 1); its model is the de-biased ``z = x / w``.
Each local step first adds whatever its inbox holds to ``(x, w)`` and de-biases into the model,
then takes the optimizer step on ``z`` and adds that step's update to ``x`` unscaled (the
paper's ``x <- x - lr * grad f(z)``: the network average ``sum x / sum w`` moves by the mean of
the ranks' updates), then every ``strategy.gossip_every`` steps keeps half of ``(x, w)``
and hands the other half to a background sender for one out-peer of ``strategy.topology`` (its
out-peers in turn). The sum of ``w`` over ranks and messages in flight is conserved (halving is
exact); a rank whose sender queue is full keeps its mass and skips that push
(``gossip/pushes_skipped``), so the step never blocks on the network; a rank whose weight is
below one half holds its mass instead of pushing until some comes back
(:data:`sparkml_dist.algo.gossip.PUSH_FLOOR`, ``gossip/pushes_held``), so a rank running ahead
of its peers cannot drive its weight, and the conditioning of ``x / w``, towards zero. (Two
orders were tried on digits: stepping before absorbing left the weight at about one half at
step time, and scaling the update by ``w`` as SGP's synchronous code does then slowed
training; unscaled updates right after a push were unstable. Absorbing first keeps ``w`` near
1 at step time.)

Orchestration (why this shape):

- Ranks start as the usual barrier stage (launch, rendezvous, the gloo group, checkpoint
  restore), because the epoch-end cuts below need collectives. Then each rank runs its own loop
  (:mod:`.loop`, which :func:`sparkml_dist.training.loop.train_rank` runs in place of the shared
  barrier loop): no collective, no per-step barrier and no blocking receive.
- Transport (:mod:`.mailbox`): each rank runs an inbox server thread on an ephemeral TCP port
  and a sender thread with a bounded queue, both over the parameter servers' wire
  (:mod:`sparkml_dist.strategies.parameter_server.wire`: HMAC-SHA256-authenticated frames, a
  JSON header and a raw float32 body, no pickle, bodies bounded before they are read) under a
  per-attempt secret that rank 0 draws and shares through the rendezvous store (sealed under the
  attempt's secret on Spark). Addresses are exchanged with one all_gather at start. The wire is
  authenticated, not encrypted, like gloo's own traffic.
- Work budget: an epoch is ``steps_per_epoch * batch_size * world_size`` training samples (the
  barrier loop's epoch) counted across the job with the rendezvous store's atomic ``add``; each
  rank cycles over its own shard in its own seeded order (a new permutation per pass) until the
  count reaches the budget. Fast ranks therefore take more steps, and the straggler's shard is
  seen less often; shards are stratified by label (``data.sharding``), so this is statistically
  benign (each shard is a sample of the same distribution). A rank finishes the step it is in
  when the budget is reached, so an epoch overshoots by at most one batch per rank
  (``perf/epoch_samples`` is the exact count) and the others wait for at most one of the
  straggler's steps. The learning-rate schedule follows the job's count (samples over the
  global batch), not a rank's own steps.
- Cuts: at each epoch end every rank flushes its sender, all ranks tell each other how many
  messages they sent to whom (one all_gather), every rank waits (bounded) until all of those
  arrived and absorbs them; the next collective (the metrics all_reduce) is a fence: no rank
  sends again before every rank has absorbed. Then validation runs on the average of the ranks'
  models ``z = x / w`` (the model a user gets; it differs from the push-sum network average
  ``sum x / sum w`` while the weights are unequal) and the checkpoint stores every rank's ``(x, w)``, model, optimizer, schedule and data
  position, and the shared part the average model, with no message in flight.
- Early stopping and ``checkpoint.every_steps`` are refused on the driver (cuts are taken at
  epoch ends only), as is a backend without point-to-point (Horovod).

Resume promise (the run tag ``sparkml_dist.resume_guarantee``): a consistent cut at the last
epoch end; a killed rank's job resumes from it (every rank at its own data position), but the
continuation depends on the ranks' timing (which messages arrive before which step), so it is
not bitwise.

Metrics per epoch (rank 0, at the epoch's last nominal step): ``gossip/rank_<r>/steps_per_s``
and ``gossip/rank_<r>/steps`` (each rank's own rate and count), ``gossip/rank_<r>/
absorbed_per_step`` (messages folded in per step), ``gossip/consensus_distance`` and
``gossip/consensus_relative`` at the cut, ``gossip/push_sum_weight_total`` (must stay the world
size), ``gossip/messages_sent``, ``gossip/pushes_skipped``, ``gossip/pushes_held``,
``gossip/message_age_s`` (mean seconds from a message's send to its absorption: its
staleness; wall clocks, so across machines it includes their skew), ``comm/bytes_sent``,
``perf/epoch_samples`` and ``perf/epoch_train_s``, and
``perf/samples_per_s``: the job's samples in the epoch over the epoch's wall time up to the cut
(an honest job rate, not a sum of rank rates). Every wait (sender flush, messages at a cut, the
store, connections) is bounded by ``backend.timeout_s``; a lost peer is an error naming it.
"""

from sparkml_dist.strategies.gossip_async.strategy import RESUME_GUARANTEE, AsyncPushSum

__all__ = ["RESUME_GUARANTEE", "AsyncPushSum"]
