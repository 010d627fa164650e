"""Stored samples -> the float32, channels-first batches models see (framework-free).

Users' files hold samples as they are: uint8/int16/float16/float32, channels first or last. The readers
keep them that way (a uint8 sample is read as 1 byte, not 4), and `SampleTransform` converts once per
batch: the cast to float32, the channel axis moved to position 1 (nhwc -> nchw, ndhwc -> ncdhw), then the
configured normalisation per channel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from hvdtrain.config import DataConfig, NormalizeConfig
from hvdtrain.errors import ConfigError

INPUT_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "float16", "float32", "float64")
DEFAULT_STATS_KEYS = {"meanstd": ("mean", "std"), "minmax": ("min", "max")}


def model_shape(stored: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The sample shape the model sees, channels first."""
    stored = tuple(int(d) for d in stored)
    if layout == "nhwc" and len(stored) >= 2:
        return (stored[-1], *stored[:-1])
    return stored


def _statistics(cfg: NormalizeConfig, channels: int, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per channel from the config's lists or its statistics file: x' = (x - shift) / scale."""
    first, second = DEFAULT_STATS_KEYS[cfg.method]
    a, b = getattr(cfg, first), getattr(cfg, second)
    where = f"{origin}.normalize"
    if a is None or b is None:
        from hvdtrain.shards.index import open_h5

        path = Path(cfg.stats_file)
        keys = cfg.stats_keys or [first, second]
        with open_h5(path) as handle:
            found = []
            for key in keys:
                if key not in handle:
                    raise ConfigError(f"{where}.stats_file: {path}: no dataset {key!r} "
                                      f"(data.normalize.stats_keys names the two datasets)")
                found.append(np.asarray(handle[key][()], np.float64).ravel())
        a, b = found
        where = f"{where}.stats_file: {path}"
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    for name, values in ((first, a), (second, b)):
        if len(values) != channels:
            raise ConfigError(f"{where}: {len(values)} {name} value(s) for samples with {channels} channel(s)")
    scale = b if cfg.method == "meanstd" else b - a
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        what = "std" if cfg.method == "meanstd" else "max - min"
        raise ConfigError(f"{where}: {what} must be positive and finite per channel, got {scale.tolist()}")
    return a, scale


class SampleTransform:
    """Converts a batch of stored samples (N, *stored_shape) of `dtype` into float32, channels first."""

    def __init__(self, cfg: DataConfig, stored_shape: tuple[int, ...], dtype, origin: str = "data"):
        self.dtype, self.layout = np.dtype(dtype), cfg.layout
        if self.dtype.name not in INPUT_DTYPES:
            raise ConfigError(f"{origin}: samples of dtype {self.dtype} (use {', '.join(INPUT_DTYPES)})")
        self.stored_shape = tuple(int(d) for d in stored_shape)
        if self.layout == "nhwc" and len(self.stored_shape) < 2:
            raise ConfigError(f"{origin}.layout: nhwc needs samples with spatial axes and a channel axis "
                              f"last, the samples have shape {self.stored_shape}")
        self.sample_shape = model_shape(self.stored_shape, self.layout)
        norm = cfg.normalize
        self.method = norm.method
        self.divisor = norm.divisor
        self.shift: Optional[np.ndarray] = None
        self.scale: Optional[np.ndarray] = None
        if norm.method in DEFAULT_STATS_KEYS:
            channels = self.sample_shape[0] if len(self.sample_shape) >= 2 else 1
            shift, scale = _statistics(norm, channels, origin)
            broadcast = (1, channels) + (1,) * (len(self.sample_shape) - 1)
            self.shift = shift.astype(np.float32).reshape(broadcast)
            self.scale = (1.0 / scale).astype(np.float32).reshape(broadcast)

    @property
    def identity(self) -> bool:
        return self.dtype == np.float32 and self.layout == "nchw" and self.method == "none"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.identity:
            return x
        if self.layout == "nhwc" and x.ndim >= 3:
            # one pass: the cast writes the channels-first copy
            out = np.empty((x.shape[0], x.shape[-1], *x.shape[1:-1]), np.float32)
            np.copyto(out, np.moveaxis(x, -1, 1), casting="unsafe")
        else:
            out = np.array(x, np.float32, copy=True) if x.dtype != np.float32 or self.method != "none" else x
        if self.method == "divide":
            out /= np.float32(self.divisor)
        elif self.shift is not None:
            out -= self.shift
            out *= self.scale
        return out
