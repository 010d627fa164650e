"""What the sparse methods carry from step to step on each rank: error feedback and DGC's momentum correction."""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit

from hvdtrain.exchange.collectives import Collectives


class ErrorFeedback:
    """The residual m of the sparsified region, this rank's own: m <- m + g; the top of m is sent; m[sent] <- 0.
    What is sent plus what stays is exactly what came in: nothing is lost, only delayed."""

    def __init__(self, size: int):
        self.residual = np.zeros(size, np.float32)
        self.pending = False  # the residual may hold gradient not yet sent (until a full release)

    def add(self, part: slice, gradient: np.ndarray) -> np.ndarray:
        """m <- m + g on `part` of the sparsified region; returns m there (a view)."""
        residual = self.residual[part]
        residual += gradient
        self.pending = True
        return residual

    def sent(self, indices: np.ndarray) -> None:
        """m[sent] <- 0."""
        self.residual[indices] = 0

    def release(self, buffer: np.ndarray, part: Optional[slice] = None) -> None:
        """Back to a dense exchange (for `part` of the sparsified region, else all of it): what was held back
        is added to the buffer, which is then sent whole."""
        if not self.pending:
            return
        whole = part is None
        part = slice(0, self.residual.size) if whole else part
        buffer[part] += self.residual[part]
        self.residual[part] = 0
        self.pending = not whole


class MomentumCorrection:
    """DGC's momentum correction: the exchange applies SGD momentum and the optimizer runs without it
    (hvdtrain.exchange.optimizer_momentum). Each rank accumulates u <- mu u + g on the sparsified region
    before error feedback and selection, so both work on u, and clears u where it was sent (momentum factor
    masking). The dense tail gets ordinary momentum on its average, so its u is equal on every rank until a
    rank joins with zeros: `sync` then restores it. With momentum 0 every method is a no-op."""

    def __init__(self, momentum: float, total: int, split: int):
        self.momentum, self.split = momentum, split
        self.velocity = np.zeros(total if momentum else 0, np.float32)

    def accelerate(self, buffer: np.ndarray, part: slice) -> np.ndarray:
        """u <- mu u + buffer[part]; buffer[part] becomes u. Returns buffer[part]."""
        if self.momentum:
            velocity = self.velocity[part]
            velocity *= self.momentum
            velocity += buffer[part]
            buffer[part] = velocity
        return buffer[part]

    def mask(self, indices: np.ndarray) -> None:
        if self.momentum:
            self.velocity[indices] = 0

    def sync(self, comm: Collectives) -> None:
        """Rank 0's dense-tail velocity on every rank (a collective: every rank calls it)."""
        tail = self.velocity[self.split:]
        if tail.size:
            tail[:] = comm.broadcast(tail.copy(), 0, "exchange.velocity")


@njit(nogil=True, cache=True, boundscheck=False)
def _accumulate(gradient, velocity, residual, momentum, threshold, indices, values):
    """u <- mu u + g (skipped without momentum: velocity empty), m <- m + u, g <- 0, entry by entry, and, in
    the same pass, the entries whose new |m| >= threshold into indices/values as topk's selection does
    (an infinite threshold selects nothing finite). Returns how many there are (may exceed capacity).
    float32 throughout, rounded as NumPy's `velocity *= mu; velocity += g; m += velocity` is."""
    count = 0
    capacity = indices.shape[0]
    if velocity.shape[0]:
        for i in range(gradient.shape[0]):
            u = velocity[i] * momentum + gradient[i]
            velocity[i] = u
            m = residual[i] + u
            residual[i] = m
            gradient[i] = 0
            if abs(m) >= threshold:
                if count < capacity:
                    indices[count] = i
                    values[count] = m
                count += 1
    else:
        for i in range(gradient.shape[0]):
            m = residual[i] + gradient[i]
            residual[i] = m
            gradient[i] = 0
            if abs(m) >= threshold:
                if count < capacity:
                    indices[count] = i
                    values[count] = m
                count += 1
    return count


_NOTHING = (np.zeros(0, np.int64), np.zeros(0, np.float32))


class Accumulation:
    """One tensor's `accumulate`, prepared but not yet run, so that top-k's selection can run it in its own
    pass over the tensor (hvdtrain.topk.TopK's `accumulation`): one pass over memory instead of two."""

    def __init__(self, feedback: ErrorFeedback, momentum: MomentumCorrection, buffer: np.ndarray, part: slice):
        self.feedback = feedback
        self.gradient, self.residual = buffer[part], feedback.residual[part]
        self.velocity = momentum.velocity[part] if momentum.momentum else momentum.velocity
        self.momentum = np.float32(momentum.momentum)

    def peek(self, positions: np.ndarray) -> np.ndarray:
        """The residual the pass will leave, at `positions` only; changes nothing. Rounded as the pass rounds."""
        incoming = self.gradient[positions]
        if self.velocity.size:
            incoming = self.velocity[positions] * self.momentum + incoming
        return self.residual[positions] + incoming

    def run(self, threshold: float = np.inf, indices: np.ndarray = _NOTHING[0], values: np.ndarray = _NOTHING[1]) -> int:
        """The pass (see _accumulate), selecting |new residual| >= threshold; returns the count."""
        self.feedback.pending = True
        return _accumulate(self.gradient, self.velocity, self.residual, self.momentum, np.float32(threshold),
                           indices, values)


def accumulate(feedback: ErrorFeedback, momentum: MomentumCorrection, buffer: np.ndarray, part: slice) -> np.ndarray:
    """`feedback.add(part, momentum.accelerate(buffer, part))` in one compiled pass instead of five over the
    tensor, leaving buffer[part] zero (the sparse methods overwrite it with the average). Returns the
    residual there, which the selection reads."""
    accumulation = Accumulation(feedback, momentum, buffer, part)
    accumulation.run()
    return accumulation.residual
