"""In-memory datasets and the per-rank batch plan (framework-free, no MPI).

The plan makes data-parallel training equal to single-process training with the global batch:
each epoch draws one seeded permutation; global batch s is a contiguous slice of it and rank r
takes the r-th per-rank slice of that global batch. The tail that does not fill a global batch is
dropped, so every rank takes the same number of steps (an uneven count would hang Horovod).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from hvdtrain.config import DataConfig
from hvdtrain.errors import ConfigError


@dataclass
class Arrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, num_classes: int) -> Arrays:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Arrays(x_train, y_train, x_test, y_test, num_classes)


def _digits(cfg: DataConfig, seed: int) -> Arrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # N, C=1, 8, 8
    return _split(x, digits.target.astype(np.int64), cfg.test_fraction, seed, 10)


def _synthetic(cfg: DataConfig, seed: int) -> Arrays:
    # Class-dependent means make the task learnable, so loss curves mean something in benchmarks.
    rng = np.random.default_rng(seed)
    shape = tuple(cfg.synthetic_shape)
    centers = rng.normal(0, 1, size=(cfg.synthetic_classes, *shape)).astype(np.float32)
    y = rng.integers(0, cfg.synthetic_classes, size=cfg.synthetic_samples).astype(np.int64)
    x = centers[y] + rng.normal(0, 1, size=(cfg.synthetic_samples, *shape)).astype(np.float32)
    return _split(x, y, cfg.test_fraction, seed, cfg.synthetic_classes)


def _npz(cfg: DataConfig, seed: int) -> Arrays:
    path = Path(cfg.source.removeprefix("npz:"))
    if not path.is_file():
        raise ConfigError(f"data.source: {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise ConfigError(f"data.source: {path}: missing array(s) {sorted(missing)}")
            x, y = npz["x"].astype(np.float32), npz["y"].astype(np.int64)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.source: {path}: not a readable .npz file ({exc})") from None
    if len(x) != len(y):
        raise ConfigError(f"data.source: {path}: x has {len(x)} samples but y has {len(y)}")
    if x.ndim == 3:
        x = x[:, None]  # grey images without a channel axis
    return _split(x, y, cfg.test_fraction, seed, int(y.max()) + 1)


def load_arrays(cfg: DataConfig, seed: int) -> Arrays:
    if cfg.source == "digits":
        return _digits(cfg, seed)
    if cfg.source == "synthetic":
        return _synthetic(cfg, seed)
    return _npz(cfg, seed)


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    batch_size: int  # per rank
    rank: int
    size: int
    seed: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size: {self.batch_size} x {self.size} ranks exceeds the "
                f"{self.num_samples} training samples; lower the batch size")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @lru_cache(maxsize=2)
    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def indices(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        order = self.epoch_order(epoch)
        start = step_in_epoch * self.global_batch + self.rank * self.batch_size
        return order[start:start + self.batch_size]


def eval_indices(num_samples: int, rank: int, size: int) -> np.ndarray:
    """This rank's disjoint share of the test set; shares cover it exactly once."""
    return np.arange(rank, num_samples, size)
