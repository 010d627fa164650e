"""Where each gradient sits in the flat buffer, and which methods sparsify it (framework-free)."""
from __future__ import annotations

from typing import Sequence

from hvdtrain.config import Config, CompressionConfig

SPARSE_METHODS = ("topk", "shared_topk", "auto")


def layout(sizes: Sequence[int], cfg: CompressionConfig) -> tuple[list[int], list[tuple[int, int]]]:
    """The order of the tensors in the flat buffer, and (offset, count) of the sparsified ones: tensors at
    least `min_size` long come first, so the sparsified region is the buffer's head and the small tensors
    (biases, norms) its tail."""
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
