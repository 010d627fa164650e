"""Synthetic science data in the layouts real workloads keep on disk, scaled down (`hvdtrain data synth`).

deepcam: MLPerf HPC DeepCAM's layout: one sample per HDF5 file, a channels-last float field
  `climate/data` (H, W, C) and an integer mask `climate/labels_0` (H, W) with 3 classes (background,
  "cyclones", "rivers"), plus `stats.h5` with per-channel `climate/minval` and `climate/maxval`.
  Channels have very different ranges, as real climate variables do, so normalisation matters; the
  mask follows smoothed versions of two channels, so a model must look at neighbourhoods.
cosmoflow: MLPerf HPC CosmoFlow's arrays: `full` (N, D, H, W, 4) int16 particle counts, channels last,
  and `unitPar` (N, 4) float32 parameters in [-1, 1], several samples per gzip-compressed file. Each
  parameter sets one channel's mean density; a shared smooth field makes the counts vary in space.
Both write train/ and test/ directories of .h5 files, each file atomically, from a seed.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from hvdtrain.atomic import atomic_path
from hvdtrain.errors import ConfigError

KINDS = ("deepcam", "cosmoflow")


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """A smooth random field of unit standard deviation."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / max(field.std(), 1e-9)


def deepcam_sample(rng: np.random.Generator, height: int, width: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    scales = 10.0 ** np.arange(channels)  # like pressure next to humidity: ranges 1 to 10^(C-1)
    offsets = np.linspace(0, 50, channels)
    fields = np.stack([_smooth(rng, (height, width), 2.0) for _ in range(channels)], axis=-1)
    x = fields * scales + offsets + 0.3 * scales * rng.standard_normal(fields.shape)
    mask = np.zeros((height, width), np.uint8)
    mask[fields[..., 1] > 1.2] = 2            # "rivers"
    mask[fields[..., 0] > 1.4] = 1            # "cyclones", where both hold
    return x, mask


def cosmoflow_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    params = rng.uniform(-1, 1, 4).astype(np.float32)
    field = _smooth(rng, (size, size, size), 1.5)
    rates = np.exp(1.0 + 0.8 * params[None, None, None, :] + 0.5 * field[..., None])
    return rng.poisson(rates).astype(np.int16), params


def _write(path: Path, datasets: dict, compression=None, chunks=None) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value, compression=compression,
                                  chunks=chunks.get(key) if chunks else None)


def write_deepcam(out: Path, train: int, test: int, height: int = 32, width: int = 48, channels: int = 4,
                  dtype: str = "float32", seed: int = 0) -> dict:
    if height < 4 or width < 4 or channels < 2:
        raise ConfigError(f"--shape: deepcam needs height, width >= 4 and 2+ channels, got {height}x{width}x{channels}")
    rng = np.random.default_rng(seed)
    low, high = np.full(channels, np.inf), np.full(channels, -np.inf)
    pixels = np.zeros(3, np.int64)
    for split, count in (("train", train), ("test", test)):
        for i in range(count):
            x, mask = deepcam_sample(rng, height, width, channels)
            x = x.astype(dtype)
            if split == "train":
                low, high = np.minimum(low, x.min((0, 1))), np.maximum(high, x.max((0, 1)))
            pixels += np.bincount(mask.ravel(), minlength=3)
            _write(out / split / f"data-{i:05d}.h5", {"climate/data": x, "climate/labels_0": mask})
    _write(out / "stats.h5", {"climate/minval": low.astype(np.float32), "climate/maxval": high.astype(np.float32)})
    return {"train": train, "test": test, "sample": [height, width, channels], "class_share": (pixels / pixels.sum()).tolist()}


def write_cosmoflow(out: Path, train: int, test: int, size: int = 16, per_file: int = 8, seed: int = 0) -> dict:
    if size < 8 or per_file < 1:
        raise ConfigError(f"--shape: cosmoflow needs volumes of 8^3 or more, got {size}^3")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for first in range(0, count, per_file):
            n = min(per_file, count - first)
            samples = [cosmoflow_sample(rng, size) for _ in range(n)]
            # odd chunks (3 samples, half a volume deep) as files written by other tools have them
            chunks = {"full": (min(3, n), max(1, size // 2), size, size, 4), "unitPar": (n, 4)}
            _write(out / split / f"cosmo-{first // per_file:05d}.h5",
                   {"full": np.stack([s[0] for s in samples]), "unitPar": np.stack([s[1] for s in samples])},
                   compression="gzip", chunks=chunks)
    return {"train": train, "test": test, "sample": [size, size, size, 4]}
