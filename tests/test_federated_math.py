"""The pure parts of federated learning against numpy references and the libraries they use:
FedAvg, FedProx, FedAdam/FedYogi, clipping and the privacy accountant, field quantization,
secure aggregation, Dirichlet splits and client sampling. No Spark."""

from __future__ import annotations

import math
import os

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from scipy import stats

from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies.federated import field, secagg
from sparkml_dist.strategies.federated.config import FederatedConfig, PrivacyConfig
from sparkml_dist.strategies.federated.dirichlet import dirichlet_counts
from sparkml_dist.strategies.federated.fedavg import WeightedMean, fedavg
from sparkml_dist.strategies.federated.fedopt import ServerOptimizer, ServerOptSettings
from sparkml_dist.strategies.federated.fedprox import proximal_term
from sparkml_dist.strategies.federated.privacy import (
    PrivacyLedger, clip_update, client_level_epsilon, gaussian_noise, local_epsilon,
    sample_level_epsilon)
from sparkml_dist.strategies.federated.sampling import dropouts, sample_clients


def test_fedavg_is_the_sample_weighted_mean():
    rng = np.random.default_rng(0)
    ups = [rng.normal(size=50).astype(np.float32) for _ in range(7)]
    ns = [int(n) for n in rng.integers(1, 100, size=7)]
    expected = sum(n * u.astype(np.float64) for n, u in zip(ns, ups)) / sum(ns)
    got = fedavg([torch.from_numpy(u) for u in ups], [float(n) for n in ns])
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    acc = WeightedMean(50)
    acc.add_sum(torch.from_numpy(sum(n * u.astype(np.float64) for n, u in zip(ns, ups))),
                sum(ns), 7)
    np.testing.assert_allclose(acc.mean().numpy(), expected, atol=1e-6)
    assert acc.mean(denominator=2 * sum(ns)).numpy() == pytest.approx(expected / 2, abs=1e-6)


def test_fedprox_term_and_its_gradient():
    p = torch.randn(5, requires_grad=True)
    a = torch.randn(5)
    term = proximal_term([p], [a], mu=0.3)
    expected = 0.15 * float(((p.detach() - a) ** 2).sum())
    assert float(term.detach()) == pytest.approx(expected, rel=1e-6)
    term.backward()
    np.testing.assert_allclose(p.grad.numpy(), (0.3 * (p - a)).detach().numpy(), rtol=1e-6)


def _numpy_server(kind, x, deltas, lr, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, written out in numpy."""
    m, v = np.zeros_like(x), np.full_like(x, tau ** 2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_server_optimizers_match_the_paper(kind):
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=30).astype(np.float32)
    deltas = [rng.normal(scale=0.1, size=30).astype(np.float32) for _ in range(6)]
    opt = ServerOptimizer(ServerOptSettings(kind, 0.05, 0.9, 0.99, 1e-3), 30)
    x = torch.from_numpy(x0)
    for d in deltas:
        x = opt.step(x, torch.from_numpy(d))
    expected = _numpy_server(kind, x0.astype(np.float64), [d.astype(np.float64) for d in deltas],
                             0.05, 0.9, 0.99, 1e-3)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-6)
    restored = ServerOptimizer(ServerOptSettings(kind, 0.05, 0.9, 0.99, 1e-3), 30)
    restored.load_state_dict(opt.state_dict())
    assert torch.equal(restored.step(x, torch.ones(30)), opt.step(x, torch.ones(30)))


def test_fedavg_server_step_is_plain_addition():
    opt = ServerOptimizer(ServerOptSettings("fedavg", 1.0), 3)
    assert torch.equal(opt.step(torch.ones(3), torch.tensor([1.0, -1.0, 0.5])),
                       torch.tensor([2.0, 0.0, 1.5]))


def test_clipping_bounds_every_update():
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.5, 1.0, 3.0, 100.0):
        u = torch.randn(200, generator=gen) * scale
        clipped, norm = clip_update(u, 1.0)
        assert norm == pytest.approx(float(u.norm()), rel=1e-6)
        assert float(clipped.norm()) <= 1.0 + 1e-6
        if norm <= 1.0:
            assert torch.equal(clipped, u)  # small updates pass unchanged
        else:
            assert torch.allclose(clipped / clipped.norm(), u / u.norm(), atol=1e-6)


def test_noise_has_the_configured_spread_and_is_seeded():
    a = gaussian_noise(200_000, 0.7, torch.Generator().manual_seed(3))
    b = gaussian_noise(200_000, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert float(a.std()) == pytest.approx(0.7, rel=0.01)
    assert abs(float(a.mean())) < 0.01


def _library_eps(event, delta):
    acc = rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


def test_reported_epsilon_is_the_accountants():
    z, q, delta = 1.1, 0.05, 1e-5
    for rounds in (1, 10, 100):
        ref = _library_eps(dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds), delta)
        assert client_level_epsilon(z, q, rounds, delta) == pytest.approx(ref, rel=1e-12)
        assert sample_level_epsilon(z, q, rounds, delta) == pytest.approx(ref, rel=1e-12)
    ref_local = _library_eps(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z / 2), 7), delta)
    assert local_epsilon(z, 7, delta) == pytest.approx(ref_local, rel=1e-12)
    assert client_level_epsilon(0.0, q, 3, delta) == math.inf
    assert client_level_epsilon(z, q, 0, delta) == 0.0


def test_ledger_projects_the_next_round_and_counts_the_worst_client():
    central = PrivacyLedger("client", "server", 1.0, 1e-5, "rdp", 0.1)
    central.record({"a": (0.5, 3)})
    assert central.epsilon() == pytest.approx(client_level_epsilon(1.0, 0.1, 1, 1e-5))
    assert central.epsilon(extra_round=True) == pytest.approx(
        client_level_epsilon(1.0, 0.1, 2, 1e-5))
    sample = PrivacyLedger("sample", "server", 1.0, 1e-5, "rdp", 1.0)
    sample.record({"a": (0.5, 4), "b": (0.25, 4)})
    sample.record({"a": (0.5, 4)})
    assert sample.epsilon() == pytest.approx(max(sample_level_epsilon(1.0, 0.5, 8, 1e-5),
                                                 sample_level_epsilon(1.0, 0.25, 4, 1e-5)))
    local = PrivacyLedger("client", "client", 2.0, 1e-5, "rdp", 1.0)
    local.record({"a": (1.0, 1)})
    local.record({"a": (1.0, 1), "b": (1.0, 1)})
    assert local.epsilon() == pytest.approx(local_epsilon(2.0, 2, 1e-5))
    restored = PrivacyLedger("sample", "server", 1.0, 1e-5, "rdp", 1.0)
    restored.load_state_dict(sample.state_dict())
    assert restored.epsilon() == sample.epsilon()


def test_field_quantization_round_trips_and_refuses_overflow():
    rng = np.random.default_rng(2)
    x = rng.normal(scale=10, size=1000)
    q = field.quantize(x, 16, summands=100)
    assert q.dtype == np.int64 and q.min() >= 0 and q.max() < field.P
    assert np.abs(field.dequantize(q, 16) - x).max() <= 2 ** -17 + 1e-12
    total = q
    for _ in range(99):
        total = field.add(total, q)
    np.testing.assert_allclose(field.dequantize(total, 16), 100 * x, atol=100 * 2 ** -17)
    with pytest.raises(ValueError, match="quant_bits"):
        field.quantize(np.array([2.0 ** 44]), 16, summands=10)


def _round(n, length, drop=(), seed=0, xs=None):
    """One secure-aggregation round run in process; returns (server sum as floats, inputs,
    one client's masked message, its plain field input)."""
    rng = np.random.default_rng(seed)
    xs = xs if xs is not None else {i: rng.normal(size=length) for i in range(1, n + 1)}
    job = os.urandom(32)
    clients = {i: secagg.SecAggClient(secagg.client_secret(job, 0, f"c{i}"), i) for i in xs}
    roster = {i: c.advertise() for i, c in clients.items()}
    t = secagg.threshold_for(n, 0.5)
    routed = secagg.route({i: c.share_keys(roster, t) for i, c in clients.items()})
    server = secagg.SecAggServer(roster, t, length)
    messages, plain = {}, {}
    for i, c in clients.items():
        plain[i] = field.quantize(xs[i], 16, n)
        messages[i] = c.masked_input(plain[i], roster)
        if i not in drop:  # a dropped client masked its input, but it never arrives
            server.add_masked(i, messages[i])
    survivors = set(xs) - set(drop)
    answers = {i: clients[i].unmask(routed[i], roster, survivors) for i in survivors}
    return field.dequantize(server.unmask(answers), 16), xs, messages, plain, answers, server


def test_secure_sum_equals_the_plain_sum():
    total, xs, *_ = _round(10, 500)
    plain = sum(xs.values())
    assert np.abs(total - plain).max() <= 10 * 2 ** -17 + 1e-9


def test_secure_sum_survives_twenty_percent_dropping_after_masking():
    total, xs, *_ = _round(10, 500, drop=(3, 8))
    survivors = sum(x for i, x in xs.items() if i not in (3, 8))
    assert np.abs(total - survivors).max() <= 8 * 2 ** -17 + 1e-9
    # Without the dropped clients' shares of their mask keys the sum is garbage: the
    # recovery is doing the work.
    assert np.abs(total - sum(xs.values())).max() > 0.1


def test_a_masked_message_is_indistinguishable_from_uniform():
    # A maximally structured update (all zeros) for client 1: its plain field input is constant.
    length = 20_000
    xs = {i: np.zeros(length) if i == 1 else np.ones(length) * i for i in range(1, 6)}
    _, _, messages, plain, _, _ = _round(5, length, xs=xs)
    seen = messages[1].astype(np.float64) / field.P
    assert stats.kstest(seen, "uniform").pvalue > 1e-3
    counts = np.histogram(seen, bins=64, range=(0, 1))[0]
    assert stats.chisquare(counts).pvalue > 1e-3
    # Two clients' messages are uncorrelated, though their inputs are fully determined.
    assert abs(np.corrcoef(seen, messages[2].astype(np.float64) / field.P)[0, 1]) < 0.05
    # The same tests reject the unmasked input, so they can fail.
    assert stats.kstest(plain[1].astype(np.float64) / field.P, "uniform").pvalue < 1e-6


def test_unmasking_needs_the_threshold_and_never_both_secrets():
    _, _, _, _, answers, server = _round(6, 50, drop=(2,))
    few = dict(list(answers.items())[:server.threshold - 1])
    with pytest.raises(ValueError, match="needed to recover"):
        server.unmask(few)
    job = os.urandom(32)
    a, b = (secagg.SecAggClient(secagg.client_secret(job, 0, c), i) for i, c in ((1, "a"),
                                                                                 (2, "b")))
    roster = {1: a.advertise(), 2: b.advertise()}
    shares = secagg.route({1: a.share_keys(roster, 2), 2: b.share_keys(roster, 2)})
    # b sees a as dropped: it reveals a's mask-key share and nothing of a's self mask.
    kinds = {v: k for v, (k, _) in b.unmask(shares[2], roster, {2}).items()}
    assert kinds == {1: "s", 2: "b"}
    with pytest.raises(ValueError, match="at least 2"):
        secagg.threshold_for(1, 0.5)


def test_dirichlet_counts_are_exact_and_skewed_by_alpha():
    classes = [180, 170, 200, 190, 160]
    skewed = dirichlet_counts(classes, 20, 0.3, np.random.default_rng(0))
    flat = dirichlet_counts(classes, 20, 100.0, np.random.default_rng(0))
    for m in (skewed, flat):
        assert m.shape == (5, 20)
        assert m.sum(axis=1).tolist() == classes
        assert m.sum(axis=0).min() >= 1

    def skew(m):  # mean share of a client's rows in its largest class
        return float(np.mean(m.max(axis=0) / m.sum(axis=0)))

    assert skew(skewed) > 0.5 > skew(flat)
    assert np.array_equal(skewed, dirichlet_counts(classes, 20, 0.3, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="fewer clients"):
        dirichlet_counts([3, 2], 10, 0.5, np.random.default_rng(0))


def test_client_sampling_is_a_function_of_seed_and_round():
    a = sample_clients(100, 10, "fixed", 7, 3)
    assert len(a) == 10 == len(set(a.tolist()))
    assert np.array_equal(a, sample_clients(100, 10, "fixed", 7, 3))
    assert not np.array_equal(a, sample_clients(100, 10, "fixed", 7, 4))
    assert np.array_equal(sample_clients(5, None, "fixed", 0, 0), np.arange(5))
    sizes = [len(sample_clients(1000, 50, "poisson", 1, r)) for r in range(40)]
    assert 45 < np.mean(sizes) < 55 and len(set(sizes)) > 1
    ids = [f"c{i}" for i in range(20)]
    assert len(dropouts(ids, 0.2, 0, 5)) == 4
    assert dropouts(ids, 0.2, 0, 5) == dropouts(ids, 0.2, 0, 5)


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="strategy.sampling=poisson"):
        FederatedConfig(clients_per_round=5, privacy=PrivacyConfig())
    with pytest.raises(ConfigError, match="proximal_mu"):
        FederatedConfig(proximal_mu=0.1, privacy=PrivacyConfig(level="sample"))
    with pytest.raises(ConfigError, match="noise_at"):
        PrivacyConfig(level="sample", noise_at="client")
    with pytest.raises(ConfigError, match="rounds"):
        FederatedConfig(rounds=0)
    FederatedConfig(clients_per_round=5, sampling="poisson", privacy=PrivacyConfig())
