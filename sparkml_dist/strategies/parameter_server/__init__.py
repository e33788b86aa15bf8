"""Parameter servers (``strategy.kind: parameter_server``): sync (BSP), async (Downpour) and
stale-synchronous (SSP) training, parameters sharded over server processes, each shard
optionally replicated.

Where things live, and why:

- A Spark barrier stage dies as a whole when one task dies, so a server inside one could never
  fail over. The servers are therefore processes the DRIVER starts (:mod:`.processes`), one per
  shard primary and one per replica, each listening on TCP at the driver's address
  (``spark.driver.host``: executors must reach the driver anyway). They live as long as the job.
- Workers are ORDINARY (non-barrier) Spark tasks, one per data shard (``mapInArrow`` over the
  prepared frame, partition r = worker r), which Spark retries one at a time. A worker's data
  position lives on the servers (its clock: the pushes they received from it), so a retried task
  asks the servers where it is (``hello``) and resumes at that step; pushes are idempotent by
  (worker, step), so a push re-sent after a crash or a failover is applied once.
- Parameters are sharded by size (greedy largest-first, :func:`sparkml_dist.algo.ps.
  shard_parameters`); each shard runs the job's own optimizer (:mod:`sparkml_dist.training.
  optim`) and schedule over its parameters (:mod:`.shard`). ``sync`` applies the mean of the
  workers' gradients once per step, which equals single-process training on the concatenated
  batch; ``async`` applies each push on arrival; ``ssp`` too, and holds a pull for step c until
  every worker has pushed c - s steps (Ho et al. 2013).
- Replication is chain replication (van Renesse and Schneider 2004): a primary applies a push,
  forwards the same request to its replica, and acknowledges the worker only after the replica
  acknowledged, all under the shard lock, so the replica applies the same pushes in the same
  order and holds the same state. When a primary is lost (connection refused, reset or closed),
  workers and the driver switch to the replica and re-send the request in flight; nothing
  restarts and no checkpoint is read. A primary that loses its replica goes on alone and says
  so in its replies; a client that then loses that primary fails with an error naming the
  shard, both servers and the step the replica was dropped at, instead of failing over to stale
  state.
- Transport (:mod:`.wire`): length-prefixed JSON header plus raw float32 bytes per frame, every
  frame authenticated with HMAC-SHA256 under a per-job secret the driver draws and ships in the
  task closure; nothing from the network is unpickled. The wire is authenticated but NOT
  encrypted: on a cluster with ``spark.ssl.enabled`` or ``spark.network.crypto.enabled`` the job
  is refused before its run starts unless ``backend.allow_unencrypted`` is true
  (:func:`.driver.check_before_run`; docs/security.md). A server refuses a frame announcing
  more than its shard's values before reading it, and drops connections idle for
  4 x ``backend.timeout_s``. Every wait is bounded by ``backend.timeout_s``, and a lost shard is
  an error naming its shard, role and address.

- Checkpoints (:mod:`.cuts`) are consistent cuts: at each epoch end and every
  ``checkpoint.every_steps`` steps, every shard holds the pulls for that step until every worker
  has pushed up to it, writes its state (values, optimizer, schedule, clocks), and the driver
  commits one checkpoint of all shards into the run. Resuming the run (``fit(...,
  resume_run_id=...)``) starts the servers from the newest cut and every worker at its step, so
  no sample is skipped or seen twice.

Resume promise (the run's ``sparkml_dist.resume_guarantee`` tag): a consistent cut; bitwise for
``sync`` only (``async``/``ssp`` continue from the cut, but what follows depends on the order
pushes arrive in). In ``async`` mode the cut is a brief barrier every checkpoint interval.
"""
