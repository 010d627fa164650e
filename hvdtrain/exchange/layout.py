"""Where each gradient sits in the flat buffer, and which methods sparsify it (framework-free)."""
from __future__ import annotations

from typing import Sequence

from hvdtrain.config import Config, CompressionConfig

SPARSE_METHODS = ("topk", "shared_topk", "auto")
# the methods the framework-free core runs on NumPy, with per-rank state (residuals, factors) to checkpoint
STATEFUL_METHODS = (*SPARSE_METHODS, "powersgd")


def layout(sizes: Sequence[int], cfg: CompressionConfig) -> tuple[list[int], list[tuple[int, int]]]:
    """The order of the tensors in the flat buffer, and (offset, count) of the compressed ones: tensors at
    least `min_size` long come first, so the compressed region is the buffer's head and the small tensors
    (biases, norms) its tail. (powersgd then factorizes the large ones that are matrices.)"""
    sparse = cfg.method in STATEFUL_METHODS
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


LIBRARY_METHODS = ("none", "fp16", "bf16", *STATEFUL_METHODS)


def library_compression(compression):
    """Library mode's `compression` argument as hvdtrain's CompressionConfig, or None for a Horovod
    compressor (the caller then hands everything to Horovod's own optimizer or tape)."""
    from hvdtrain.config import CompressionConfig

    if isinstance(compression, str):
        if compression not in LIBRARY_METHODS:
            raise ValueError(f"compression: unknown method {compression!r} (use {', '.join(LIBRARY_METHODS)} or "
                             "a Horovod compressor)")
        compression = CompressionConfig(method=compression)
    if not isinstance(compression, CompressionConfig):
        return None
    if compression.momentum_correction:
        raise ValueError("compression.momentum_correction needs hvdtrain's own training loop (hvdtrain train)")
    return compression
