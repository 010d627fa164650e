"""Approximate top-k selection by magnitude, fast enough to run every step (framework-free).

An exact top-k (torch.topk, a full partition) costs many copies of the tensor, too much for every
step. Instead (as DGC does): estimate the k-th largest magnitude from a stratified random sample, select
everything above it in one compiled pass into preallocated buffers, and correct the threshold (at most a
few passes, rarely needed) so the count lands within 10% of k; too many is trimmed to exactly k by a
partition of the few candidates.
Its cost against a plain copy of the tensor is measured by `hvdtrain bench compression` (benchmarks/README.md).

The sample's positions are a pure function of (seed, key): the exchange keys each call by (rank, step,
tensor), so a run resumed from a checkpoint selects exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import numpy as np
from numba import njit

SAMPLE_MIN, SAMPLE_MAX = 25_000, 100_000
TOLERANCE = 0.1
MASK64 = (1 << 64) - 1


def sample_seed(*key: int) -> int:
    """A well-mixed seed for `_sample_positions` from a few integers (SplitMix64 over each in turn)."""
    state = 0x9E3779B97F4A7C15
    for part in key:
        state = (state ^ (part & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        state = (state ^ state >> 30) * 0xBF58476D1CE4E5B9 & MASK64
        state = (state ^ state >> 27) * 0x94D049BB133111EB & MASK64
        state ^= state >> 31
    return state >> 1 | 1  # a positive int64, never 0 (the xorshift's fixed point)


@njit(nogil=True, cache=True, boundscheck=False)
def _sample_positions(n, count, seed):
    """One random position per stride of an n-entry tensor (random, so periodic layouts cannot bias it)."""
    out = np.empty(count, np.int64)
    state = np.uint64(seed) | np.uint64(1)
    for i in range(count):
        lo = i * n // count
        width = (i + 1) * n // count - lo
        state ^= state << np.uint64(13)
        state ^= state >> np.uint64(7)
        state ^= state << np.uint64(17)
        out[i] = lo + np.int64((state >> np.uint64(32)) * np.uint64(width) >> np.uint64(32))  # no division
    return out


@njit(nogil=True, cache=True, boundscheck=False)
def _select(x, threshold, indices, values):
    """Entries with |x| >= threshold into the buffers; returns how many there are (may exceed capacity)."""
    count = 0
    capacity = indices.shape[0]
    for i in range(x.shape[0]):
        v = x[i]
        if abs(v) >= threshold:
            if count < capacity:
                indices[count] = i
                values[count] = v
            count += 1
    return count


@njit(nogil=True, cache=True, boundscheck=False)
def scatter_mean(buffer, indices, values, ranks, touched):
    """buffer[i] = (sum of the values sent for i) / ranks at every gathered index i, in one compiled pass
    over the k x ranks entries (np.add.at, then dividing the whole region, cost two passes over the
    tensor). The sums accumulate in the gathered order, as np.add.at's do, so the bits are the same.
    The regions must be zero before; `touched` (uint8, one per buffer entry, all zero) is left all zero."""
    for j in range(indices.shape[0]):
        buffer[indices[j]] += values[j]
    for j in range(indices.shape[0]):
        i = indices[j]
        if touched[i] == 0:
            buffer[i] /= ranks
            touched[i] = 1
    for j in range(indices.shape[0]):
        touched[indices[j]] = 0


def _threshold(sample: np.ndarray, k: int, n: int, scale: float = 1.0) -> np.float32:
    want = min(len(sample), max(1, round(len(sample) * k * scale / n)))
    value = np.partition(sample, len(sample) - want)[len(sample) - want]
    # mostly-zero tensors: never select zeros
    return value if value > 0 else np.float32(np.finfo(np.float32).tiny)


class TopK:
    """Reusable selector: its buffers persist across calls; it keeps no random state."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per tensor length

    def __call__(self, x: np.ndarray, k: int, *key: int, accumulation=None) -> tuple[np.ndarray, np.ndarray]:
        """(values, int64 indices) of about the k largest |x| (within 10% of k; fewer if x has fewer non-zeros).
        The same (seed, key) and x always give the same selection.
        `accumulation` (hvdtrain.exchange.feedback.Accumulation): what error feedback still has to add to x,
        x being its residual. The threshold is estimated from a sample of x as it will be, and the
        accumulation runs as the selection's first pass: the result is the same as running it first."""
        n = x.shape[0]
        k = max(1, min(k, n))
        capacity = 2 * k + 64
        if n not in self.buffers or len(self.buffers[n][0]) < capacity:  # k changes under sparsity warm-up
            self.buffers[n] = (np.empty(capacity, np.int64), np.empty(capacity, np.float32))
        indices, values = self.buffers[n]
        sample_size = min(SAMPLE_MAX, max(SAMPLE_MIN, n // 250))
        if n <= 4 * sample_size:  # small: the whole tensor is the sample
            if accumulation is not None:
                accumulation.run()
                accumulation = None
            sample = np.abs(x)
        else:
            positions = _sample_positions(n, sample_size, sample_seed(self.seed, *key))
            sample = np.abs(x[positions] if accumulation is None else accumulation.peek(positions))
        threshold = _threshold(sample, k, n)
        if accumulation is None:
            count = _select(x, threshold, indices, values)
        else:
            count = accumulation.run(threshold, indices, values)
        for attempt in range(1, 5):  # bounded correction
            if count > capacity:
                threshold = max(np.nextafter(threshold, np.float32(np.inf)), _threshold(sample, k, n, 0.7 ** attempt))
            elif count < (1 - TOLERANCE) * k and count < np.count_nonzero(sample) * n / len(sample):
                threshold = min(np.nextafter(threshold, np.float32(0)), _threshold(sample, k, n, 1.5 ** attempt))
            else:
                break
            count = _select(x, threshold, indices, values)
        if count > capacity or (count < (1 - TOLERANCE) * k and count < np.count_nonzero(x)):
            # Ties around the threshold (e.g. many equal magnitudes) defeat any threshold: select exactly.
            indices = np.argpartition(np.abs(x), n - k)[n - k:]
            indices = indices[x[indices] != 0]
            return x[indices], indices.astype(np.int64)
        if count > (1 + TOLERANCE) * k:  # too many: keep exactly the k largest of the candidates
            keep = np.argpartition(np.abs(values[:count]), count - k)[count - k:]
            return values[keep].copy(), indices[keep].copy()
        return values[:count].copy(), indices[:count].copy()

