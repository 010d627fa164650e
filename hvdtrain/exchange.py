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
  - auto: times none and topk on the first steps (and again every `auto_recheck_every` steps) and uses
    the faster; all ranks agree on the measured times before deciding.
Top-k's share can start larger and fall geometrically to `ratio` over `warmup_steps` (DGC's sparsity
warm-up), so the first, largest gradients are not mostly held back.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from hvdtrain.config import CompressionConfig
from hvdtrain.topk import TopK, select_with_feedback

SPARSE_METHODS = ("topk", "shared_topk", "auto")
INDEX_BYTES = 4  # indices travel as int32


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


def density(cfg: CompressionConfig, step: int) -> float:
    """Share of each tensor sent at `step`: from warmup_ratio down to ratio, geometrically, over warmup_steps."""
    if step >= cfg.warmup_steps or cfg.warmup_ratio <= cfg.ratio:
        return cfg.ratio
    return cfg.warmup_ratio * (cfg.ratio / cfg.warmup_ratio) ** (step / cfg.warmup_steps)


class Exchange:
    def __init__(self, large: list[tuple[int, int]], cfg: CompressionConfig, comm: Collectives):
        self.cfg, self.comm, self.large = cfg, comm, large
        self.split = sum(n for _, n in large)  # buffer[:split] may be sparsified, the rest is dense
        self.residual = np.zeros(self.split, np.float32)
        self.residual_pending = False  # error feedback holds gradient not yet sent
        self.select = TopK(seed=comm.rank)
        self.step, self.bytes_sent, self.stats_step = 0, 0, 0
        self.auto_choice, self.auto_times, self.auto_trials = None, None, {"none": [], "topk": []}

    def __call__(self, buffer: np.ndarray) -> None:
        """Average `buffer` (float32, laid out by `layout`) over all ranks, in place."""
        method = self.cfg.method
        if self.comm.size == 1:  # the average of one rank is its gradient: no Horovod cycle to wait for
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
            result.update(compression=f"auto:{self.auto_choice}", auto_seconds={"none": self.auto_times[0],
                                                                                  "topk": self.auto_times[1]})
        self.bytes_sent, self.stats_step = 0, self.step
        return result

    # methods -----------------------------------------------------------------------------------
    def _run(self, method: str, buffer: np.ndarray) -> int:
        if method == "topk":
            return self._topk(buffer)
        if method == "shared_topk":
            return self._shared_topk(buffer)
        self._flush_residual(buffer)
        return self._dense(buffer)

    def _dense_async(self, region: np.ndarray) -> list:
        return [self.comm.allreduce_async(region, f"gradients.dense.{region.size}")] if region.size else []

    def _dense(self, region: np.ndarray) -> int:
        for handle in self._dense_async(region):
            self.comm.wait(handle)
        return region.nbytes

    def _flush_residual(self, buffer: np.ndarray) -> None:
        """Back to dense exchange: what error feedback held back is sent now, not lost."""
        if self.residual_pending:
            buffer[:self.split] += self.residual
            self.residual[:] = 0
            self.residual_pending = False

    def _k(self, count: int) -> int:
        return max(1, int(count * density(self.cfg, self.step)))

    def _topk(self, buffer: np.ndarray) -> int:
        """Error feedback: m += g; select top-k of m per tensor; m[selected] = 0; allgather what was selected."""
        self.residual_pending = True
        grads, values, indices = buffer[:self.split], [], []
        for offset, count in self.large:
            part = slice(offset, offset + count)
            v, i = select_with_feedback(self.residual[part], grads[part], self._k(count), self.select)
            values.append(v)
            indices.append((i + offset).astype(np.int32))
        values, indices = np.concatenate(values), np.concatenate(indices)
        # Enqueued together, the three collectives are negotiated in one Horovod cycle instead of three.
        gathers = [self.comm.allgather_async(values, "topk.values"),
                   self.comm.allgather_async(indices, "topk.indices")]
        dense = self._dense_async(buffer[self.split:])
        all_values, all_indices = (self.comm.wait(handle) for handle in gathers)
        for handle in dense:
            self.comm.wait(handle)
        grads[:] = 0
        np.add.at(grads, all_indices, all_values)
        grads /= self.comm.size
        return values.nbytes + indices.nbytes + buffer[self.split:].nbytes

    def _shared_topk(self, buffer: np.ndarray) -> int:
        self.residual += buffer[:self.split]
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
        handles = [self.comm.allreduce_async(values, "shared_topk.values"), *self._dense_async(buffer[self.split:])]
        for handle in handles:
            self.comm.wait(handle)
        self.residual[indices] = 0
        grads = buffer[:self.split]
        grads[:] = 0
        grads[indices] = values
        sent = values.nbytes + (picked.nbytes if self.comm.rank == leader else 0)
        return sent + buffer[self.split:].nbytes

    def _auto(self, buffer: np.ndarray) -> int:
        """Time none and topk on trial steps, agree on the times across ranks, use the faster."""
        trial, phase = self.cfg.auto_trial_steps, self.step % self.cfg.auto_recheck_every
        if phase >= 2 * trial:
            return self._run(self.auto_choice, buffer)
        method = "none" if phase < trial else "topk"  # measuring: `trial` steps dense, then `trial` top-k
        started = time.perf_counter()
        sent = self._run(method, buffer)
        self.auto_trials[method].append(time.perf_counter() - started)
        if phase == 2 * trial - 1:
            medians = np.array([np.median(self.auto_trials["none"]), np.median(self.auto_trials["topk"])])
            worst = self.comm.maximum(medians, "auto.times")  # the same decision everywhere
            self.auto_choice = "topk" if worst[1] < worst[0] else "none"
            self.auto_times = worst.tolist()
            self.auto_trials = {"none": [], "topk": []}
        return sent
