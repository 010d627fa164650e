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
from hvdtrain.exchange.feedback import Accumulation, ErrorFeedback, MomentumCorrection, accumulate
from hvdtrain.topk import TopK, scatter_mean


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
        self.touched = np.zeros(self.split, np.uint8)  # scatter_mean's scratch
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
            # error feedback's accumulation runs as the selection's pass over the tensor
            v, i = self.select(self.feedback.residual[part], entries_sent(self.cfg, step, count), rank, step, offset,
                               accumulation=Accumulation(self.feedback, self.momentum, buffer, part))
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
        if gathered:  # the active tensors' entries are zero (accumulate)
            all_values, all_indices = gathered
            scatter_mean(buffer, all_indices, all_values, np.float32(ranks), self.touched)
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
        residual = self.feedback.residual[:split]
        leader = step % comm.size  # ScaleCom-style cyclic leader
        # A fixed-size index message (-1 pads it) spares broadcasting its length first: selection lands
        # within 10% above k, so every rank knows the size.
        ks = [entries_sent(self.cfg, step, count) for _, count in self.large]
        picked = np.full(sum(int(1.1 * k) + 1 for k in ks), -1, np.int32)
        if rank == leader:  # the large tensors tile the head; each one's accumulation runs in its selection
            chosen = np.concatenate([
                self.select(residual[o:o + n], k, rank, step, o,
                            accumulation=Accumulation(self.feedback, self.momentum, buffer, slice(o, o + n)))[1] + o
                for (o, n), k in zip(self.large, ks)])
            picked[:len(chosen)] = chosen
        else:
            accumulate(self.feedback, self.momentum, buffer, slice(0, split))
        indices = comm.broadcast(picked, leader, "shared_topk.indices")
        indices = indices[indices >= 0]
        values = residual[indices]
        _wait(comm, [comm.allreduce_async(values, "shared_topk.values"),
                     *_dense_async(comm, buffer[split:], split)])
        self.feedback.sent(indices)
        self.momentum.mask(indices)
        self.momentum.accelerate(buffer, slice(split, buffer.size))
        buffer[indices] = values  # the rest of the head is zero (accumulate)
        return values.nbytes + (picked.nbytes if rank == leader else 0) + buffer[split:].nbytes


def matrix_view(shape, output_axis: int) -> Optional[tuple[int, int]]:
    """The 2-D view PowerSGD factorizes: the output axis against all others (PyTorch keeps output channels
    first, Keras last; a rank-r factorization of a matrix and of its transpose are the same), or None for a
    vector."""
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        return None
    outputs = shape[output_axis]
    return (outputs, int(np.prod(shape)) // outputs) if output_axis == 0 else (int(np.prod(shape)) // outputs, outputs)


def powersgd_pays(rows: int, cols: int, cfg: CompressionConfig) -> bool:
    """PyTorch's rule (min_compression_rate): factorize only where the two factors are at least
    `powersgd_min_rate` times smaller than the matrix."""
    rank = min(cfg.powersgd_rank, rows, cols)
    return rows * cols >= cfg.powersgd_min_rate * (rows + cols) * rank


def _rows_per_block(columns: int) -> int:
    """Rows of a float32 matrix that fill about 256 KiB, so the passes over a block run in the CPU cache."""
    return max(1, (1 << 18) // (4 * columns))


class PowerSGD:
    """powersgd (Vogels et al., NeurIPS 2019), as PyTorch's powerSGD_hook runs it, over Horovod allreduce.

    Each large matrix M (gradient + this rank's residual) is sent as two thin factors: P = M Q is averaged
    over the ranks and orthonormalized, then Q = M^T P is averaged, and the average gradient is
    approximated by P Q^T (exact in the average: mean(M_i)^T P = mean(M_i^T P)). The residual keeps
    M - P Q^T (error feedback); Q is reused at the next step (warm start), so one power iteration per step
    tracks the gradient's leading subspace. Vectors, matrices the rule says do not pay, and the dense tail
    go in the first allreduce's Horovod cycle; the first `powersgd_start_step` steps are all dense. Q
    starts from a generator seeded by the tensor's place in the buffer, so every rank draws the same."""

    def __init__(self, large: list[tuple[int, int]], matrices: list[Optional[tuple[int, int]]],
                 cfg: CompressionConfig, comm: Collectives, feedback: ErrorFeedback):
        self.large, self.cfg, self.comm, self.feedback = large, cfg, comm, feedback
        self.split = sum(n for _, n in large)
        self.factorized = [(offset, count, shape) for (offset, count), shape in zip(large, matrices)
                           if shape is not None and powersgd_pays(*shape, cfg)]
        done = {offset for offset, _, _ in self.factorized}
        self.dense_large = [(offset, count) for offset, count in large if offset not in done]
        self.q = [self._fresh_q(offset, shape, 0) for offset, _, shape in self.factorized]
        # auto times PowerSGD in its own trial steps, whatever the start step
        self.start_step = cfg.powersgd_start_step if cfg.method == "powersgd" else 0
        self.comm_seconds = 0.0

    def _fresh_q(self, offset: int, shape: tuple[int, int], step: int) -> np.ndarray:
        rank = min(self.cfg.powersgd_rank, *shape)
        seed = [offset] if self.cfg.powersgd_warm_start else [offset, step]
        return np.random.default_rng(seed).standard_normal((shape[1], rank)).astype(np.float32)

    def state(self) -> np.ndarray:
        """The warm-start factors, flat (equal on every rank)."""
        return np.concatenate([q.ravel() for q in self.q]) if self.q else np.zeros(0, np.float32)

    def load_state(self, flat: np.ndarray) -> None:
        if flat.size != sum(q.size for q in self.q):
            from hvdtrain.errors import ConfigError
            raise ConfigError(f"compression: the checkpoint's PowerSGD factors have {flat.size} entries, this "
                              f"model's {sum(q.size for q in self.q)} (the model or compression.powersgd_* changed)")
        start = 0
        for q in self.q:
            q.ravel()[:] = flat[start:start + q.size]
            start += q.size

    def sync(self) -> None:
        """Rank 0's factors on every rank (a collective; after a resize, where a joining rank has fresh ones)."""
        if self.q:
            self.load_state(self.comm.broadcast(self.state(), 0, "powersgd.q"))

    def exchange(self, buffer: np.ndarray, step: int) -> int:
        comm = self.comm
        if step < self.start_step or not self.factorized:
            self.feedback.release(buffer)
            _wait(comm, _dense_async(comm, buffer, 0))
            return buffer.nbytes
        started = time.perf_counter()
        residuals, ps = [], []
        if not self.cfg.powersgd_warm_start:
            self.q = [self._fresh_q(offset, shape, step) for offset, _, shape in self.factorized]
        for (offset, count, shape), q in zip(self.factorized, self.q):
            m = self.feedback.residual[offset:offset + count].reshape(shape)
            p = np.empty((shape[0], q.shape[1]), np.float32)
            rows = _rows_per_block(shape[1])
            for r in range(0, shape[0], rows):  # M = residual + gradient, then P = M Q, while M's rows are in cache
                part = slice(offset + r * shape[1], offset + min(r + rows, shape[0]) * shape[1])
                np.matmul(self.feedback.add(part, buffer[part]).reshape(-1, shape[1]), q, out=p[r:r + rows])
            residuals.append(m)
            ps.append(p)
        flat_p = np.concatenate([p.ravel() for p in ps])
        dense = [(self.split, buffer[self.split:])]
        for offset, count in self.dense_large:
            self.feedback.release(buffer, slice(offset, offset + count))
            dense.append((offset, buffer[offset:offset + count]))
        handles = [comm.allreduce_async(flat_p, "powersgd.p"),
                   *(h for offset, region in dense for h in _dense_async(comm, region, offset))]
        _wait(comm, handles)
        qs, start = [], 0
        for m, p in zip(residuals, ps):
            p = np.linalg.qr(flat_p[start:start + p.size].reshape(p.shape))[0].astype(np.float32, copy=False)
            start += p.size
            ps[len(qs)] = p
            qs.append(m.T @ p)
        flat_q = np.concatenate([q.ravel() for q in qs])
        _wait(comm, [comm.allreduce_async(flat_q, "powersgd.q")])
        start = 0
        for i, ((offset, count, shape), m, p) in enumerate(zip(self.factorized, residuals, ps)):
            q = flat_q[start:start + qs[i].size].reshape(qs[i].shape)
            start += q.size
            approximation = buffer[offset:offset + count].reshape(shape)
            rows = _rows_per_block(shape[1])
            for r in range(0, shape[0], rows):
                block = approximation[r:r + rows]
                np.matmul(p[r:r + rows], q.T, out=block)  # the average, written straight into the buffer
                m[r:r + rows] -= block  # the residual: what this rank's gradient had beyond the shared approximation
            self.q[i] = np.ascontiguousarray(q)
        self.comm_seconds = time.perf_counter() - started
        return flat_p.nbytes + flat_q.nbytes + sum(region.nbytes for _, region in dense)
