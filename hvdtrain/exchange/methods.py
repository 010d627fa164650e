"""The exchange methods, one class each: how the flat buffer becomes the average over all ranks.

Each has one method, `exchange(buffer, step) -> int`: average `buffer` (float32, laid out by `layout`)
in place over all ranks and return the bytes this rank sent. `step` is passed, not kept: the facade's
counter (hvdtrain.exchange.core, checkpointed) is the only one. The number of ranks is read from the
collectives on each call, never stored (see `Collectives`).
  - Dense (none): one allreduce of the buffer;
  - AllgatherTopK (topk): per tensor, the largest entries of gradient + residual (error feedback) are
    allgathered as values and indices, summed and averaged; the tail takes a dense allreduce in the same
    Horovod cycle;
  - SharedTopK (shared_topk): a rotating leader picks the indices from its residual-corrected gradient and
    broadcasts them; every rank allreduces its values at those indices, so traffic does not grow with the
    number of ranks (ScaleCom's cyclic local top-k).
Top-k's share can start larger and fall geometrically to `ratio` over `warmup_steps` (DGC's sparsity
warm-up), so the first, largest gradients are not mostly held back.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from hvdtrain.config import CompressionConfig
from hvdtrain.exchange.collectives import Collectives
from hvdtrain.exchange.feedback import ErrorFeedback, MomentumCorrection
from hvdtrain.topk import TopK


def density(cfg: CompressionConfig, step: int) -> float:
    """Share of each tensor sent at `step`: from warmup_ratio down to ratio, geometrically, over warmup_steps."""
    if step >= cfg.warmup_steps or cfg.warmup_ratio <= cfg.ratio:
        return cfg.ratio
    return cfg.warmup_ratio * (cfg.ratio / cfg.warmup_ratio) ** (step / cfg.warmup_steps)


def entries_sent(cfg: CompressionConfig, step: int, count: int) -> int:
    """k: how many of a tensor's `count` entries top-k sends at `step`."""
    return max(1, int(count * density(cfg, step)))


def _dense_async(comm: Collectives, region: np.ndarray, offset: int) -> list:
    return [comm.allreduce_async(region, f"gradients.dense.{offset}")] if region.size else []


def _wait(comm: Collectives, handles: list[Any]) -> None:
    for handle in handles:
        comm.wait(handle)


class Dense:
    """none: one allreduce of the buffer. After sparse steps (auto), what error feedback held back goes too."""

    def __init__(self, comm: Collectives, feedback: Optional[ErrorFeedback] = None):
        self.comm, self.feedback = comm, feedback

    def exchange(self, buffer: np.ndarray, step: int) -> int:
        if self.feedback is not None:
            self.feedback.release(buffer)
        _wait(self.comm, _dense_async(self.comm, buffer, 0))
        return buffer.nbytes


class AllgatherTopK:
    """topk. auto may turn tensors off (`active`), and reads the timings of the last call."""

    def __init__(self, large: list[tuple[int, int]], cfg: CompressionConfig, comm: Collectives,
                 feedback: ErrorFeedback, momentum: MomentumCorrection):
        self.large, self.cfg, self.comm = large, cfg, comm
        self.feedback, self.momentum = feedback, momentum
        self.split = sum(n for _, n in large)  # buffer[:split] may be sparsified, the rest is dense
        self.select = TopK()
        self.active = [True] * len(large)
        self.select_seconds: list[float] = []  # per active tensor
        self.comm_seconds = 0.0

    def exchange(self, buffer: np.ndarray, step: int) -> int:
        comm, ranks, rank = self.comm, self.comm.size, self.comm.rank
        values, indices, dense, self.select_seconds = [], [], [(self.split, buffer[self.split:])], []
        for (offset, count), active in zip(self.large, self.active):
            part = slice(offset, offset + count)
            if not active:
                self.feedback.release(buffer, part)
                dense.append((offset, buffer[part]))
                continue
            started = time.perf_counter()
            residual = self.feedback.add(part, self.momentum.accelerate(buffer, part))
            v, i = self.select(residual, entries_sent(self.cfg, step, count), rank, step, offset)
            i += offset
            self.feedback.sent(i)
            self.momentum.mask(i)
            self.select_seconds.append(time.perf_counter() - started)
            values.append(v)
            indices.append(i.astype(np.int32))
        values = np.concatenate(values) if values else np.zeros(0, np.float32)
        indices = np.concatenate(indices) if indices else np.zeros(0, np.int32)
        started = time.perf_counter()
        # Enqueued together, the collectives are negotiated in one Horovod cycle instead of one each.
        gathers = [comm.allgather_async(values, "topk.values"),
                   comm.allgather_async(indices, "topk.indices")] if values.size else []
        handles = [h for offset, region in dense for h in _dense_async(comm, region, offset)]
        gathered = [comm.wait(handle) for handle in gathers]
        _wait(comm, handles)
        self.comm_seconds = time.perf_counter() - started
        sparse = [slice(o, o + n) for (o, n), active in zip(self.large, self.active) if active]
        for part in sparse:
            buffer[part] = 0
        if gathered:
            all_values, all_indices = gathered
            np.add.at(buffer, all_indices, all_values)
        for part in sparse:
            buffer[part] /= ranks
        for offset, region in dense:
            self.momentum.accelerate(buffer, slice(offset, offset + region.size))
        return values.nbytes + indices.nbytes + sum(region.nbytes for _, region in dense)


class SharedTopK:
    """shared_topk."""

    def __init__(self, large: list[tuple[int, int]], cfg: CompressionConfig, comm: Collectives,
                 feedback: ErrorFeedback, momentum: MomentumCorrection):
        self.large, self.cfg, self.comm = large, cfg, comm
        self.feedback, self.momentum = feedback, momentum
        self.split = sum(n for _, n in large)
        self.select = TopK()

    def exchange(self, buffer: np.ndarray, step: int) -> int:
        comm, split, rank = self.comm, self.split, self.comm.rank
        residual = self.feedback.add(slice(0, split), self.momentum.accelerate(buffer, slice(0, split)))
        leader = step % comm.size  # ScaleCom-style cyclic leader
        # A fixed-size index message (-1 pads it) spares broadcasting its length first: selection lands
        # within 10% above k, so every rank knows the size.
        ks = [entries_sent(self.cfg, step, count) for _, count in self.large]
        picked = np.full(sum(int(1.1 * k) + 1 for k in ks), -1, np.int32)
        if rank == leader:
            chosen = np.concatenate([self.select(residual[o:o + n], k, rank, step, o)[1] + o
                                     for (o, n), k in zip(self.large, ks)])
            picked[:len(chosen)] = chosen
        indices = comm.broadcast(picked, leader, "shared_topk.indices")
        indices = indices[indices >= 0]
        values = residual[indices]
        _wait(comm, [comm.allreduce_async(values, "shared_topk.values"),
                     *_dense_async(comm, buffer[split:], split)])
        self.feedback.sent(indices)
        self.momentum.mask(indices)
        self.momentum.accelerate(buffer, slice(split, buffer.size))
        head = buffer[:split]
        head[:] = 0
        head[indices] = values
        return values.nbytes + (picked.nbytes if rank == leader else 0) + buffer[split:].nbytes
