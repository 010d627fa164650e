"""Alpha-beta cost model of the gradient exchanges (framework-free).

alpha is the per-message latency (s), beta the bandwidth (bytes/s) of one link, and overhead what the
framework adds per collective call (Horovod's background-thread cycle). For N ranks and M bytes:
  ring allreduce      2(N-1) alpha + 2(N-1)/N  M / beta
  top-k (allgather)   (N-1) alpha + (N-1) k (value + index bytes) / beta   -- grows with N
  shared-index top-k  broadcast of k indices + ring allreduce of k values -- does not grow with N
Efficiency assumes no overlap of communication with compute (a conservative bound):
  E(N) = t_compute / (t_compute + t_exchange(N)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

VALUE_BYTES, INDEX_BYTES = 4, 4  # float32 values, int32 indices


def ring_volume(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring allreduce of `nbytes`."""
    return 2 * (ranks - 1) / ranks * nbytes


def topk_volume(k: int, ranks: int) -> float:
    """Bytes each rank receives in the allgather of k values and k indices from every other rank."""
    return (ranks - 1) * k * (VALUE_BYTES + INDEX_BYTES)


@dataclass(frozen=True)
class Link:
    alpha: float  # seconds per message
    beta: float   # bytes per second
    overhead: float = 0.0  # seconds per collective call in the framework (Horovod's negotiation cycle)

    @classmethod
    def fit_ring(cls, nbytes: Sequence[float], seconds: Sequence[float], ranks: int) -> "Link":
        """Least-squares fit of measured ring-allreduce times t = a + b M to the model above."""
        if ranks < 2:
            raise ValueError("fitting a link needs measurements with at least 2 ranks")
        b, a = np.polyfit(np.asarray(nbytes, float), np.asarray(seconds, float), 1)
        steps = 2 * (ranks - 1)
        return cls(alpha=max(a, 0.0) / steps, beta=steps / ranks / b)

    def ring_allreduce(self, nbytes: float, ranks: int) -> float:
        if ranks == 1:
            return 0.0
        return 2 * (ranks - 1) * self.alpha + ring_volume(nbytes, ranks) / self.beta

    def broadcast(self, nbytes: float, ranks: int) -> float:
        """Pipelined broadcast: a latency per tree level and the message about once over a link."""
        if ranks == 1:
            return 0.0
        return math.ceil(math.log2(ranks)) * self.alpha + nbytes / self.beta

    def topk_allgather(self, k: int, ranks: int) -> float:
        if ranks == 1:
            return 0.0
        return (ranks - 1) * self.alpha + topk_volume(k, ranks) / self.beta

    def shared_topk(self, k: int, ranks: int) -> float:
        return self.broadcast(k * INDEX_BYTES, ranks) + self.ring_allreduce(k * VALUE_BYTES, ranks)

    def exchange(self, method: str, gradient_bytes: float, ranks: int, ratio: float = 0.01) -> float:
        k = max(1, int(gradient_bytes / VALUE_BYTES * ratio))
        calls = 0 if ranks == 1 else 1
        if method == "dense":
            return calls * self.overhead + self.ring_allreduce(gradient_bytes, ranks)
        if method == "fp16":
            return calls * self.overhead + self.ring_allreduce(gradient_bytes / 2, ranks)
        if method == "topk":  # one allgather of values, one of indices
            return 2 * calls * self.overhead + self.topk_allgather(k, ranks)
        if method == "shared_topk":  # a broadcast of indices, an allreduce of values
            return 2 * calls * self.overhead + self.shared_topk(k, ranks)
        raise ValueError(f"unknown method {method!r}")


def efficiency(compute_seconds: float, exchange_seconds: float) -> float:
    return compute_seconds / (compute_seconds + exchange_seconds)


def project(link: Link, gradient_bytes: float, compute_seconds: float, ranks: Sequence[int],
            methods: Sequence[str] = ("dense", "fp16", "topk", "shared_topk"), ratio: float = 0.01) -> dict:
    return {m: [efficiency(compute_seconds, link.exchange(m, gradient_bytes, n, ratio)) for n in ranks]
            for m in methods}
