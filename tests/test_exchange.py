"""The framework-free gradient exchange (hvdtrain.exchange) on an in-process group of N ranks.

Each rank is a thread with its own `Exchange`; their collectives meet at a barrier and really combine
every rank's arrays, so averages, residuals, leaders and resizes are checked without MPI or Horovod.
"""
from __future__ import annotations

import threading
from functools import reduce

import numpy as np
import pytest

from hvdtrain.config import CompressionConfig
from hvdtrain.exchange import Exchange, layout

SIZES = [150_000, 3_000, 40, 10]  # one tensor large enough that top-k samples, one small, a dense tail


class Group:
    """N ranks in N threads. Every collective waits for all ranks, checks they run the same one (a real job
    would hang otherwise), and returns what Horovod would. `size` may change between steps."""

    def __init__(self, size: int):
        self.resize(size)

    def resize(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)  # a rank that skips a collective fails, not hangs
        self.slots: list = [None] * size

    def collect(self, rank: int, call: tuple, array: np.ndarray) -> list[np.ndarray]:
        self.slots[rank] = (call, array.copy())
        self.barrier.wait()
        calls, parts = zip(*self.slots)
        self.barrier.wait()  # all have read before the next collective overwrites
        assert len(set(calls)) == 1, f"ranks ran different collectives: {calls}"
        return list(parts)

    def run(self, step) -> list:
        """step(rank) on every rank, in threads; their results."""
        results, errors = [None] * self.size, []

        def body(rank):
            try:
                results[rank] = step(rank)
            except BaseException as error:  # noqa: BLE001 (reported below)
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


class Ranks:
    """hvdtrain.exchange.Collectives for one rank of a `Group`; rank and size are read on every access."""

    def __init__(self, group: Group, rank: int):
        self.group, self._rank = group, rank
        self.calls = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self.group.size

    def _collect(self, kind, name, array, *extra):
        self.calls += 1
        return self.group.collect(self._rank, (kind, name, array.dtype.str, *extra), array)

    def allreduce_async(self, array, name):
        parts = self._collect("allreduce", name, array, array.shape)
        np.copyto(array, reduce(np.add, parts) / np.float32(len(parts)))

    def allgather_async(self, array, name):
        return np.concatenate(self._collect("allgather", name, array))

    def wait(self, handle):
        return handle

    def broadcast(self, array, root, name):
        return self._collect("broadcast", name, array, array.shape, root)[root]

    def maximum(self, array, name):
        return np.max(self._collect("maximum", name, array, array.shape), axis=0)


def config(method: str, **overrides) -> CompressionConfig:
    return CompressionConfig(method=method, ratio=0.01, min_size=1000, **overrides)


def exchanges(group: Group, cfg: CompressionConfig, momentum: float = 0.0) -> list[Exchange]:
    _, large = layout(SIZES, cfg)
    return [Exchange(large, cfg, Ranks(group, rank), sum(SIZES), momentum) for rank in range(group.size)]


def gradient(rank: int, step: int) -> np.ndarray:
    rng = np.random.default_rng([rank, step])
    return (rng.standard_normal(sum(SIZES)) * rng.uniform(0.1, 10)).astype(np.float32)


def step_all(group: Group, ranks: list[Exchange], step: int) -> list[np.ndarray]:
    buffers = [gradient(rank, step) for rank in range(group.size)]
    group.run(lambda rank: ranks[rank](buffers[rank]))
    return buffers


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_dense_is_exactly_the_average(size):
    group = Group(size)
    ranks = exchanges(group, config("none"))
    for step in range(3):
        incoming = [gradient(rank, step) for rank in range(size)]
        out = step_all(group, ranks, step)
        expected = incoming[0] if size == 1 else reduce(np.add, incoming) / np.float32(size)
        for buffer in out:
            assert np.array_equal(buffer, expected)
    stats = ranks[0].stats()
    assert stats["bytes_per_step"] == (0 if size == 1 else 4 * sum(SIZES)) and stats["compression"] == "none"


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["topk", "shared_topk", "auto"])
def test_sparse_average_is_what_was_sent_and_error_feedback_keeps_the_rest(method, size):
    """Per rank, sent = gradient + old residual - new residual (nothing lost); every rank ends with the
    average of what all sent, sparse where top-k selected; the small tensors' average is exact."""
    group = Group(size)
    cfg = config(method, warmup_steps=4, auto_trial_steps=2, auto_recheck_every=10)
    ranks = exchanges(group, cfg)
    split = sum(n for _, n in layout(SIZES, cfg)[1])
    for step in range(12):
        incoming = [gradient(rank, step) for rank in range(size)]
        old = [r.feedback.residual.copy() for r in ranks]
        out = step_all(group, ranks, step)
        sent = [g[:split] + m - r.feedback.residual for g, m, r in zip(incoming, old, ranks)]
        for rank in range(1, size):
            assert np.array_equal(out[rank], out[0])  # identical on every rank
        expected = sent[0] if size == 1 else reduce(np.add, sent) / np.float32(size)
        assert np.array_equal(out[0][:split], expected)
        tail = [g[split:] for g in incoming]
        assert np.array_equal(out[0][split:], tail[0] if size == 1 else reduce(np.add, tail) / np.float32(size))
        for s, r in zip(sent, ranks):
            assert not np.any(s * r.feedback.residual)  # an entry is either sent or kept, never both
        if size > 1 and method != "auto":  # auto may choose dense steps
            assert np.count_nonzero(sent[0]) <= 1.1 * 0.25 * split + size  # top-k: a small share (warm-up: 25%)
    if size > 1:
        stats = ranks[0].stats()
        assert 0 < stats["bytes_per_step"] and stats["compression"].startswith(method)


@pytest.mark.parametrize("method", ["topk", "shared_topk"])
def test_a_restored_exchange_continues_bitwise_like_the_uninterrupted_one(method):
    """state()/load_state(): step, residual and velocity restored, and top-k samples from (rank, step,
    tensor) rather than a running generator, so the outputs after a resume are the same bits."""
    cfg = config(method, momentum_correction=True, warmup_steps=6)
    straight_group, resumed_group = Group(2), Group(2)
    straight = exchanges(straight_group, cfg, momentum=0.9)
    first = exchanges(resumed_group, cfg, momentum=0.9)
    for step in range(4):
        step_all(straight_group, straight, step)
        step_all(resumed_group, first, step)
    saved = [{k: v.copy() for k, v in r.state().items()} for r in first]
    assert set(saved[0]) == {"step", "residual", "velocity"} and int(saved[0]["step"][0]) == 4
    resumed = exchanges(resumed_group, cfg, momentum=0.9)  # a new process: fresh exchanges
    for r, state in zip(resumed, saved):
        r.load_state(state)
    for step in range(4, 9):
        a, b = step_all(straight_group, straight, step), step_all(resumed_group, resumed, step)
        for x, y in zip(a, b):
            assert np.array_equal(x, y), f"step {step}"
    for x, y in zip(straight, resumed):
        assert np.array_equal(x.feedback.residual, y.feedback.residual)
        assert np.array_equal(x.momentum.velocity, y.momentum.velocity)


def test_methods_without_state_save_nothing_and_a_wrong_layout_is_refused():
    from hvdtrain.errors import ConfigError

    group = Group(1)
    assert exchanges(group, config("none"))[0].state() == {}
    assert exchanges(group, config("fp16"))[0].state() == {}
    topk = exchanges(group, config("topk"))[0]
    with pytest.raises(ConfigError, match="residual"):
        topk.load_state({"residual": np.zeros(5, np.float32)})
    topk.load_state({"velocity": np.zeros(3, np.float32)})  # kept by another configuration: ignored


def test_the_number_of_ranks_is_read_live():
    """A job that grows from 1 rank to 2: the first rank must enter the allreduce the new rank entered
    (a copied size of 1 made it skip it, and the job hung). Then it shrinks back."""
    group = Group(1)
    cfg = config("shared_topk", momentum_correction=True)
    ranks = exchanges(group, cfg, momentum=0.9)
    for step in range(3):
        (out,) = step_all(group, ranks, step)
    assert ranks[0].comm.calls == 0 and ranks[0].stats()["bytes_per_step"] == 0  # one rank: no collective

    group.resize(2)
    _, large = layout(SIZES, cfg)
    ranks.append(Exchange(large, cfg, Ranks(group, 1), sum(SIZES), 0.9))
    group.run(lambda rank: ranks[rank].on_resize())
    split = sum(n for _, n in large)
    assert ranks[1].step == ranks[0].step == 3
    assert np.array_equal(ranks[1].momentum.velocity[split:], ranks[0].momentum.velocity[split:])
    for step in range(3, 6):
        out = step_all(group, ranks, step)
        assert np.array_equal(out[0], out[1])
    assert ranks[0].comm.calls > 0 and ranks[0].stats()["bytes_per_step"] > 0

    group.resize(1)  # rank 1 left; what rank 0's error feedback held back is sent on its own
    held = ranks[0].feedback.residual.copy()
    (out,) = step_all(group, ranks[:1], 6)
    assert held.any() and not ranks[0].feedback.residual.any()


def test_momentum_correction_accelerates_held_back_entries_and_masks_sent_ones():
    """Two ranks with the same gradient, so the average equals each rank's own values."""
    cfg = CompressionConfig(method="topk", ratio=0.01, min_size=100, momentum_correction=True)
    mu, n, tail = 0.9, 1000, 10
    group = Group(2)
    ranks = [Exchange([(0, n)], cfg, Ranks(group, rank), n + tail, momentum=mu) for rank in range(2)]
    same = np.full(n + tail, 1e-3, np.float32)
    same[:10] = 1.0  # the k = 10 large entries: selected every step
    velocity, held = 0.0, 0.0
    for step in range(5):
        buffers = [same.copy(), same.copy()]
        group.run(lambda rank: ranks[rank](buffers[rank]))
        velocity = mu * velocity + 1e-3  # what an entry that is never sent accumulates
        held += velocity
        buffer, exchange = buffers[0], ranks[0]
        assert np.allclose(buffer[:10], 1.0)  # sent every step, so their velocity is masked each time
        assert np.allclose(buffer[n:], velocity, rtol=1e-5)  # dense tensors: ordinary momentum
        assert np.allclose(exchange.feedback.residual[10:], held, rtol=1e-5)  # held back: corrected momentum
        assert np.allclose(buffer[10:n], 0)
    assert not exchange.momentum.velocity[:10].any() and not exchange.feedback.residual[:10].any()


# PowerSGD ---------------------------------------------------------------------------------------------------
MATRICES = [(300, 500), (30, 100), None, None]  # the 2-D views of SIZES' tensors (the 3,000 one: a 30x100)


def powersgd_exchanges(group: Group, cfg: CompressionConfig) -> list[Exchange]:
    _, large = layout(SIZES, cfg)
    return [Exchange(large, cfg, Ranks(group, rank), sum(SIZES), matrices=MATRICES[:len(large)])
            for rank in range(group.size)]


def low_rank_gradient(rank: int, step: int, rank_of: int = 2) -> np.ndarray:
    """Every rank's gradient of the first matrix lies in the same rank-2 subspace (as real gradients
    mostly do); the rest is noise."""
    grad = gradient(rank, step)
    rng, common = np.random.default_rng([rank, step, 1]), np.random.default_rng(7)
    u, v = common.standard_normal((300, rank_of)), common.standard_normal((rank_of, 500))
    grad[:150_000] = (u @ np.diag(rng.uniform(1, 2, rank_of)) @ v).astype(np.float32).ravel()
    return grad


def test_the_powersgd_rule_and_views_match_pytorchs():
    from hvdtrain.exchange import matrix_view, powersgd_pays

    assert matrix_view((64, 32, 3, 3), 0) == (64, 288)  # torch conv: outputs first
    assert matrix_view((3, 3, 32, 64), -1) == (288, 64)  # Keras conv: outputs last
    assert matrix_view((10,), 0) is None
    cfg = CompressionConfig(method="powersgd", powersgd_rank=4)
    assert powersgd_pays(300, 500, cfg) and not powersgd_pays(10, 8, cfg)  # 80 entries vs 4 x 18 x 2


@pytest.mark.parametrize("size", [2, 3])
def test_powersgd_is_exact_in_the_average_and_error_feedback_keeps_the_rest(size):
    """After start_step, each matrix goes as rank-4 factors, identical on every rank: the projection of the
    average of what the ranks fed in (gradient + residual) onto the averaged, orthonormalized P; each rank
    keeps what was not sent. Vectors are the exact average. Bytes: the factors and the vectors only."""
    group = Group(size)
    cfg = config("powersgd", powersgd_start_step=2, powersgd_rank=4)
    ranks = powersgd_exchanges(group, cfg)
    assert [shape for _, _, shape in ranks[0].powersgd.factorized] == [(300, 500), (30, 100)]
    split = 153_000
    for step in range(6):
        incoming = [gradient(rank, step) for rank in range(size)]
        fed = [g[:split] + r.feedback.residual for g, r in zip(incoming, ranks)]
        out = step_all(group, ranks, step)
        for rank in range(1, size):
            assert np.array_equal(out[rank], out[0])
        dense_average = reduce(np.add, incoming) / np.float32(size)
        np.testing.assert_allclose(out[0][split:], dense_average[split:], rtol=1e-6)
        mean_fed = reduce(np.add, fed) / size
        if step < 2:  # start_step: dense
            np.testing.assert_allclose(out[0][:split], mean_fed, rtol=1e-5, atol=1e-6)
            assert not any(r.feedback.residual.any() for r in ranks)
            continue
        for offset, count, shape in ranks[0].powersgd.factorized:
            part = slice(offset, offset + count)
            approx, target = out[0][part].reshape(shape), mean_fed[part].reshape(shape)
            p = np.linalg.svd(approx.astype(np.float64))[0][:, :4]  # the column space of P
            np.testing.assert_allclose(approx, p @ (p.T @ target), atol=1e-3 * np.abs(target).max())
        for f, r in zip(fed, ranks):  # sent + kept = fed, per rank
            np.testing.assert_allclose(out[0][:split] + r.feedback.residual, f, atol=1e-3)
    factorized_step = 4 * 4 * ((300 + 500) + (30 + 100)) + 4 * (sum(SIZES) - split)  # P and Q, rank 4
    assert ranks[0].stats()["bytes_per_step"] == (2 * 4 * sum(SIZES) + 4 * factorized_step) / 6


def test_powersgd_recovers_a_low_rank_average_and_resumes_bitwise():
    """Gradients of rank 2 are sent exactly by rank-4 factors once the warm-started Q has found their
    subspace; state()/load_state() (step, residual, Q) make a resumed exchange give the same bits."""
    cfg = config("powersgd", powersgd_start_step=0, powersgd_rank=4)
    straight_group, resumed_group = Group(2), Group(2)
    straight, first = powersgd_exchanges(straight_group, cfg), powersgd_exchanges(resumed_group, cfg)

    def run(group, ranks, step):
        buffers = [low_rank_gradient(rank, step) for rank in range(2)]
        expected = (buffers[0] + buffers[1]) / 2
        group.run(lambda rank: ranks[rank](buffers[rank]))
        return buffers, expected

    for step in range(3):
        run(straight_group, straight, step)
        run(resumed_group, first, step)
    saved = [{k: v.copy() for k, v in r.state().items()} for r in first]
    assert set(saved[0]) == {"step", "residual", "powersgd_q"} and saved[0]["powersgd_q"].size == (500 + 100) * 4
    resumed = powersgd_exchanges(resumed_group, cfg)
    for r, state in zip(resumed, saved):
        r.load_state(state)
    for step in range(3, 6):
        (a, expected), (b, _) = run(straight_group, straight, step), run(resumed_group, resumed, step)
        for x, y in zip(a, b):
            assert np.array_equal(x, y), f"step {step}"
        error = np.abs(a[0][:150_000] - expected[:150_000]).max() / np.abs(expected[:150_000]).max()
        assert error < 1e-3, (step, error)  # the residual stays small: nothing the factors miss


def test_auto_times_powersgd_and_records_it():
    group = Group(2)
    cfg = config("auto", auto_trial_steps=2, auto_recheck_every=10)
    ranks = powersgd_exchanges(group, cfg)
    assert ranks[0].auto.powersgd is not None
    for step in range(9):
        step_all(group, ranks, step)
    record = ranks[0].stats()
    assert {"none", "topk", "powersgd"} <= set(record["auto_seconds"]), record
    assert record["compression"] in ("auto:none", "auto:topk", "auto:powersgd")
