"""Gradient exchange with sparsification, framework-free: dense, top-k, shared-index top-k and auto.

Every gradient sits in one flat float32 NumPy buffer, tensors at least `min_size` long first (`layout`), so
the sparsified region is the buffer's head and the small tensors (biases, norms) its tail. `Exchange`
averages that buffer in place over all ranks through `Collectives`, which each framework adapter supplies
with Horovod's ops (hvdtrain.torch.exchange, hvdtrain.tf.exchange):
  - none: one allreduce of the buffer;
  - topk: per tensor, the largest entries of gradient + residual (error feedback) are allgathered as
    values and indices, summed and averaged; the tail takes a dense allreduce in the same Horovod cycle;
  - shared_topk: a rotating leader picks the indices from its residual-corrected gradient and broadcasts
    them; every rank allreduces its values at those indices, so traffic does not grow with the number of
    ranks (ScaleCom's cyclic local top-k);
  - auto: per tensor, from measurements of the first steps (again every `auto_recheck_every` steps): a
    few dense steps and a few top-k steps give the link's bandwidth (alpha-beta: both exchanges pay the
    same fixed cost per step, and differ in volume) and each tensor's selection time; a tensor is
    compressed when the wire time it saves exceeds its selection time. The chosen mix is then timed
    against dense and kept only if it is not slower. All ranks agree on the times (their maximum), so
    they take the same decision.
Top-k's share can start larger and fall geometrically to `ratio` over `warmup_steps` (DGC's sparsity
warm-up), so the first, largest gradients are not mostly held back. With `momentum_correction` (DGC), the
exchange applies SGD momentum itself and the optimizer runs without it: each rank accumulates velocity
u <- mu u + g locally, error feedback and selection work on u, and sent entries are cleared from both
residual and velocity (momentum factor masking); dense tensors get ordinary momentum on their average.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from hvdtrain.config import Config, CompressionConfig
from hvdtrain.costmodel import VALUE_BYTES, ring_volume, topk_volume
from hvdtrain.topk import TopK, select_with_feedback

SPARSE_METHODS = ("topk", "shared_topk", "auto")


class Collectives(Protocol):
    """The Horovod operations the exchange needs, on NumPy arrays."""
    rank: int
    size: int

    def allreduce_async(self, array: np.ndarray, name: str) -> Any:
        """Start averaging `array` in place."""

    def allgather_async(self, array: np.ndarray, name: str) -> Any:
        """Start concatenating every rank's `array`."""

    def wait(self, handle: Any) -> Optional[np.ndarray]:
        """Finish an operation; an allgather's result."""

    def broadcast(self, array: np.ndarray, root: int, name: str) -> np.ndarray: ...

    def maximum(self, array: np.ndarray, name: str) -> np.ndarray: ...


def layout(sizes: Sequence[int], cfg: CompressionConfig) -> tuple[list[int], list[tuple[int, int]]]:
    """The order of the tensors in the flat buffer, and (offset, count) of the sparsified ones."""
    sparse = cfg.method in SPARSE_METHODS
    order = sorted(range(len(sizes)), key=lambda i: not (sparse and sizes[i] >= cfg.min_size))
    large, offset = [], 0
    for i in order:
        if sparse and sizes[i] >= cfg.min_size:
            large.append((offset, sizes[i]))
        offset += sizes[i]
    return order, large


def optimizer_momentum(cfg: Config) -> float:
    """The optimizer's SGD momentum: none under momentum correction, where the exchange applies it."""
    return 0.0 if cfg.compression.momentum_correction else cfg.train.momentum


def density(cfg: CompressionConfig, step: int) -> float:
    """Share of each tensor sent at `step`: from warmup_ratio down to ratio, geometrically, over warmup_steps."""
    if step >= cfg.warmup_steps or cfg.warmup_ratio <= cfg.ratio:
        return cfg.ratio
    return cfg.warmup_ratio * (cfg.ratio / cfg.warmup_ratio) ** (step / cfg.warmup_steps)


def link_bandwidth(dense_seconds: float, dense_volume: float, sparse_seconds: float,
                   sparse_volume: float) -> Optional[float]:
    """Bytes/s implied by two measured exchanges with the same fixed cost per step (t = c + volume / beta);
    None when the dense exchange was not both larger and slower (communication is then free to us)."""
    if dense_volume <= sparse_volume or dense_seconds <= sparse_seconds:
        return None
    return (dense_volume - sparse_volume) / (dense_seconds - sparse_seconds)


def worth_compressing(counts: Sequence[int], ks: Sequence[int], select_seconds: Sequence[float], ranks: int,
                      bandwidth: Optional[float]) -> list[bool]:
    """Per tensor: does the wire time top-k saves (ring allreduce of n values vs allgather of k values and
    indices) exceed the time spent selecting?"""
    if bandwidth is None or ranks < 2:
        return [False] * len(counts)
    return [(ring_volume(VALUE_BYTES * n, ranks) - topk_volume(k, ranks)) / bandwidth > seconds
            for n, k, seconds in zip(counts, ks, select_seconds)]


class Exchange:
    def __init__(self, large: list[tuple[int, int]], cfg: CompressionConfig, comm: Collectives,
                 total: int = 0, momentum: float = 0.0):
        """`total`: the buffer's length; `momentum`: SGD's, applied here under momentum_correction."""
        self.cfg, self.comm, self.large = cfg, comm, large
        self.split = sum(n for _, n in large)  # buffer[:split] may be sparsified, the rest is dense
        self.residual = np.zeros(self.split, np.float32)
        self.momentum = momentum if cfg.momentum_correction else 0.0
        self.velocity = np.zeros(total if self.momentum else 0, np.float32)
        self.residual_pending = False  # error feedback holds gradient not yet sent
        self.select = TopK(seed=comm.rank)
        self.step, self.bytes_sent, self.stats_step = 0, 0, 0
        self.active = [True] * len(large)  # the large tensors top-k sparsifies (auto may turn some off)
        self.select_seconds, self.comm_seconds = [], 0.0  # of the last top-k step (auto's measurements)
        self.auto_choice, self.auto_pending, self.auto_record = None, False, {}
        self.auto_trials: dict[str, list] = {}

    def __call__(self, buffer: np.ndarray) -> None:
        """Average `buffer` (float32, laid out by `layout`) over all ranks, in place."""
        method = self.cfg.method
        if self.comm.size == 1:  # the average of one rank is its gradient: no Horovod cycle to wait for
            self._accelerate(buffer, slice(None))
            self.count(0)
        elif method == "auto":
            self.count(self._auto(buffer))
        else:
            self.count(self._run(method, buffer))

    def count(self, sent: int) -> None:
        """One step done, `sent` bytes put on the wire (adapters' own fp16/bf16 exchanges report here too)."""
        self.bytes_sent += sent
        self.step += 1

    def stats(self) -> dict:
        """Bytes this rank put on the wire per step since the last call, and the auto decision."""
        steps = max(1, self.step - self.stats_step)
        result = {"bytes_per_step": self.bytes_sent / steps, "compression": self.cfg.method}
        if self.cfg.method == "auto" and self.auto_choice:
            result.update(compression=f"auto:{self.auto_choice}", **self.auto_record)
        self.bytes_sent, self.stats_step = 0, self.step
        return result

    # methods -----------------------------------------------------------------------------------
    def _run(self, method: str, buffer: np.ndarray) -> int:
        if method == "topk":
            return self._topk(buffer)
        if method == "shared_topk":
            return self._shared_topk(buffer)
        if self.residual_pending:
            self._flush_residual(buffer)
            self.residual_pending = False
        return self._dense(buffer)

    def _dense_async(self, region: np.ndarray, offset: int) -> list:
        return [self.comm.allreduce_async(region, f"gradients.dense.{offset}")] if region.size else []

    def _dense(self, region: np.ndarray) -> int:
        for handle in self._dense_async(region, 0):
            self.comm.wait(handle)
        return region.nbytes

    def _flush_residual(self, buffer: np.ndarray, part: slice = slice(None)) -> None:
        """Back to dense exchange (for `part` of the sparsified region, or all of it): what error feedback
        held back is sent now, not lost."""
        buffer[:self.split][part] += self.residual[part]
        self.residual[part] = 0

    def _k(self, count: int) -> int:
        return max(1, int(count * density(self.cfg, self.step)))

    def _topk(self, buffer: np.ndarray) -> int:
        """Error feedback: m += g; select top-k of m per tensor; m[selected] = 0; allgather what was selected.
        Tensors not active, and the small ones, take a dense allreduce in the same Horovod cycle."""
        self.residual_pending = True
        values, indices, dense, self.select_seconds = [], [], [(self.split, buffer[self.split:])], []
        for (offset, count), active in zip(self.large, self.active):
            part = slice(offset, offset + count)
            if not active:
                self._flush_residual(buffer, part)
                dense.append((offset, buffer[part]))
                continue
            started = time.perf_counter()
            gradient = self._accelerate(buffer, part)
            v, i = select_with_feedback(self.residual[part], gradient, self._k(count), self.select)
            if self.momentum:
                self.velocity[part][i] = 0  # momentum factor masking
            self.select_seconds.append(time.perf_counter() - started)
            values.append(v)
            indices.append((i + offset).astype(np.int32))
        values, indices = np.concatenate(values), np.concatenate(indices)
        started = time.perf_counter()
        # Enqueued together, the collectives are negotiated in one Horovod cycle instead of one each.
        gathers = [self.comm.allgather_async(values, "topk.values"),
                   self.comm.allgather_async(indices, "topk.indices")]
        handles = [h for offset, region in dense for h in self._dense_async(region, offset)]
        all_values, all_indices = (self.comm.wait(handle) for handle in gathers)
        for handle in handles:
            self.comm.wait(handle)
        self.comm_seconds = time.perf_counter() - started
        sparse = [slice(o, o + n) for (o, n), active in zip(self.large, self.active) if active]
        for part in sparse:
            buffer[part] = 0
        np.add.at(buffer, all_indices, all_values)
        for part in sparse:
            buffer[part] /= self.comm.size
        for offset, region in dense:
            self._accelerate(buffer, slice(offset, offset + region.size))
        return values.nbytes + indices.nbytes + sum(region.nbytes for _, region in dense)

    def _accelerate(self, buffer: np.ndarray, part: slice) -> np.ndarray:
        """Momentum correction: u <- mu u + buffer; the buffer becomes u (unchanged without correction)."""
        if self.momentum:
            velocity = self.velocity[part]
            velocity *= self.momentum
            velocity += buffer[part]
            buffer[part] = velocity
        return buffer[part]

    def _shared_topk(self, buffer: np.ndarray) -> int:
        self.residual += self._accelerate(buffer, slice(0, self.split))
        leader = self.step % self.comm.size  # ScaleCom-style cyclic leader
        # A fixed-size index message (-1 pads it) spares broadcasting its length first: selection lands
        # within 10% above k, so every rank knows the size.
        ks = [self._k(count) for _, count in self.large]
        picked = np.full(sum(int(1.1 * k) + 1 for k in ks), -1, np.int32)
        if self.comm.rank == leader:
            chosen = np.concatenate([self.select(self.residual[o:o + n], k)[1] + o
                                     for (o, n), k in zip(self.large, ks)])
            picked[:len(chosen)] = chosen
        indices = self.comm.broadcast(picked, leader, "shared_topk.indices")
        indices = indices[indices >= 0]
        values = self.residual[indices]
        handles = [self.comm.allreduce_async(values, "shared_topk.values"),
                   *self._dense_async(buffer[self.split:], self.split)]
        for handle in handles:
            self.comm.wait(handle)
        self.residual[indices] = 0
        if self.momentum:
            self.velocity[indices] = 0  # momentum factor masking
            self._accelerate(buffer, slice(self.split, buffer.size))
        grads = buffer[:self.split]
        grads[:] = 0
        grads[indices] = values
        sent = values.nbytes + (picked.nbytes if self.comm.rank == leader else 0)
        return sent + buffer[self.split:].nbytes

    def _auto(self, buffer: np.ndarray) -> int:
        """Trial steps: `auto_trial_steps` dense, as many top-k on every large tensor, then (if the model
        picked any tensor) as many with the model's choice; afterwards the decision until the re-check."""
        trial, phase = self.cfg.auto_trial_steps, self.step % self.cfg.auto_recheck_every
        if phase == 0:
            self.auto_trials = {"none": [], "topk": [], "chosen": [], "select": [], "comm": []}
        if phase < trial:
            stage = "none"
        elif phase < 2 * trial:
            stage, self.active = "topk", [True] * len(self.large)
        elif phase < 3 * trial and self.auto_pending:
            stage = "chosen"
        else:
            return self._run(self.auto_choice, buffer)
        started = time.perf_counter()
        sent = self._run("none" if stage == "none" else "topk", buffer)
        self.auto_trials[stage].append(time.perf_counter() - started)
        if stage == "topk":
            self.auto_trials["select"].append(self.select_seconds)
            self.auto_trials["comm"].append(self.comm_seconds)
        if phase == 2 * trial - 1:
            self._auto_model(buffer)
        elif phase == 3 * trial - 1:
            self._auto_verify()
        return sent

    def _auto_model(self, buffer: np.ndarray) -> None:
        trials, ranks = self.auto_trials, self.comm.size
        local = [np.median(trials["none"]), np.median(trials["comm"]), np.median(trials["topk"]),
                 *np.median(trials["select"], axis=0)]
        agreed = self.comm.maximum(np.array(local, np.float64), "auto.model")  # the same inputs everywhere
        dense_seconds, sparse_comm, topk_seconds, select = agreed[0], agreed[1], agreed[2], agreed[3:]
        counts = [n for _, n in self.large]
        ks = [self._k(n) for n in counts]
        bandwidth = link_bandwidth(dense_seconds, ring_volume(buffer.nbytes, ranks), sparse_comm,
                                   topk_volume(sum(ks), ranks) + ring_volume(buffer[self.split:].nbytes, ranks))
        self.active = worth_compressing(counts, ks, select, ranks, bandwidth)
        self.auto_record = {"auto_seconds": {"none": float(dense_seconds), "topk": float(topk_seconds)},
                            "auto_link_bytes_per_s": bandwidth,
                            "auto_tensors": f"{sum(self.active)} of {len(self.active)} compressed"}
        self.auto_pending = any(self.active)
        if not self.auto_pending:
            self.auto_choice = "none"

    def _auto_verify(self) -> None:
        """Keep the model's choice only if it measured no slower than dense."""
        local = np.array([np.median(self.auto_trials["none"]), np.median(self.auto_trials["chosen"])])
        dense_seconds, chosen_seconds = self.comm.maximum(local, "auto.verify")
        self.auto_record["auto_seconds"]["chosen"] = float(chosen_seconds)
        self.auto_pending = False
        if chosen_seconds <= dense_seconds:
            self.auto_choice = "topk"
        else:
            self.auto_choice, self.auto_record["auto_tensors"] = "none", f"0 of {len(self.active)} compressed"
