"""In-memory data sources: digits, synthetic, a user's .npz file or directory of .npy pairs (framework-free).

Training (hvdtrain.data) and `hvdtrain data shard` (hvdtrain.shards.writer) both open data here, so one
config yields the same train and test samples whether it is trained in memory or sharded first. A source
is split once, by `split_indices`; each split is a `Source` read by sample range. Synthetic samples are
generated in fixed blocks of sample ids, so a sample's value never depends on how it is read, and a set
of any size is written without holding it in memory.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hvdtrain.errors import ConfigError
from hvdtrain.world import world

SPECS = ("digits, synthetic, npz:PATH, npy:DIR (a directory of x.npy/y.npy or NAME_x.npy/NAME_y.npy pairs), "
         "or hdf5:PATH (users' HDF5 files: a directory, a glob or a file)")
# Synthetic samples are generated this many bytes at a time. Part of what a seed means: changing it
# changes every synthetic set.
SYNTHETIC_BLOCK_BYTES = 1 << 20


@dataclass
class Source:
    """`count` samples of one shape; `read(start, stop)` returns samples [start, stop) as (x, y)."""
    count: int
    sample_shape: tuple[int, ...]
    x_dtype: np.dtype
    num_classes: int  # 0 for regression targets
    read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    label_shape: tuple[int, ...] = ()
    y_dtype: np.dtype = np.dtype(np.int64)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample, in memory."""
        return self.read(0, self.count)


Splits = dict[str, Source]  # "train" and "test"


def _note(message: str) -> None:
    if world.rank == 0:
        print(f"hvdtrain: {message}", file=sys.stderr, flush=True)


def _test_count(n: int, test_fraction: float, origin: str) -> int:
    """Samples in the test set (scikit-learn's rule); both sets must get at least one."""
    n_test = ceil(test_fraction * n)
    if not 0 < n_test < n:
        raise ConfigError(f"{origin}: a test fraction of {test_fraction} of {n} samples leaves "
                          f"{'no test' if n_test <= 0 else 'no training'} samples")
    return n_test


def checked(x: np.ndarray, y: np.ndarray, origin: str, task: str = "classification") -> tuple[np.ndarray, np.ndarray]:
    """A user's arrays as samples and labels the task allows (int64 classes, float32 targets); grey images
    (N, H, W) get a channel axis."""
    from hvdtrain import tasks

    kind = tasks.get(task)
    if x.ndim == 0 or y.ndim == 0 or (task == "classification" and y.ndim != 1):
        raise ConfigError(f"{origin}: x must hold samples along its first axis and y one label per sample "
                          f"(x has shape {x.shape}, y {y.shape})")
    if len(x) != len(y):
        raise ConfigError(f"{origin}: x has {len(x)} samples but y has {len(y)}")
    if len(y) < 2:
        raise ConfigError(f"{origin}: needs at least 2 samples, found {len(y)}")
    if not kind.classes:
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
            raise ConfigError(f"{origin}: regression targets y must be finite numbers, found {y.dtype}")
        return x, y.astype(np.float32, copy=False)
    if not np.issubdtype(y.dtype, np.integer):
        whole = np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))
        if not whole:
            raise ConfigError(f"{origin}: labels y must be integers (class ids), found {y.dtype}")
    if y.min() < 0:
        raise ConfigError(f"{origin}: negative label {y.min():g} in y; labels are class ids 0, 1, ...")
    if x.ndim == 3 and (y.ndim == 1 or x.shape == y.shape):
        x = x[:, None]  # grey images (or fields) without a channel axis
    return x, y.astype(np.int64)


def split_indices(y: np.ndarray, test_fraction: float, seed: int, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sample indices: stratified by label where every class can be, else a seeded shuffle.

    Stratifying needs 2 samples of each class and room for every class in both sets; when the labels do
    not allow it, the split falls back to a plain shuffle and says why in one line.
    """
    from sklearn.model_selection import train_test_split

    ids = np.arange(len(y))
    n_test = _test_count(len(y), test_fraction, origin)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):  # masks, targets: nothing to stratify by
        train, test = train_test_split(ids, test_size=test_fraction, random_state=seed)
        return train, test
    classes, counts = np.unique(y, return_counts=True)
    smallest = int(np.argmin(counts))
    if counts[smallest] < 2:
        reason = f"class {classes[smallest]} has {counts[smallest]} sample"
    elif min(n_test, len(y) - n_test) < len(classes):
        which, size = ("test", n_test) if n_test < len(y) - n_test else ("training", len(y) - n_test)
        reason = f"a {which} set of {size} samples cannot hold all {len(classes)} classes"
    else:
        train, test = train_test_split(ids, test_size=test_fraction, random_state=seed, stratify=y)
        return train, test
    _note(f"{origin}: {reason}: splitting train/test by a seeded shuffle, not stratified by class")
    train, test = train_test_split(ids, test_size=test_fraction, random_state=seed)
    return train, test


def _indexed(x: np.ndarray, y: np.ndarray, ids: np.ndarray, num_classes: int) -> Source:
    """The samples x[ids], gathered per read (x may be memory-mapped)."""
    return Source(len(ids), tuple(x.shape[1:]), x.dtype, num_classes,
                  lambda a, b: (np.asarray(x[ids[a:b]]), y[ids[a:b]]), tuple(y.shape[1:]), y.dtype)


def array_splits(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, origin: str,
                 task: str = "classification") -> Splits:
    """A user's arrays, checked and split into train and test."""
    x, y = checked(x, y, origin, task)
    train, test = split_indices(y, test_fraction, seed, origin)
    num_classes = int(y.max()) + 1 if np.issubdtype(y.dtype, np.integer) else 0
    return {"train": _indexed(x, y, train, num_classes), "test": _indexed(x, y, test, num_classes)}


def digits(test_fraction: float, seed: int, origin: str = "digits") -> Splits:
    """scikit-learn's 8x8 digits (1797 samples), scaled to [0, 1], with a channel axis."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]  # N, C=1, 8, 8
    return array_splits(x, data.target, test_fraction, seed, origin)


def synthetic(shape: Sequence[int], classes: int, count: int, seed: int, test_fraction: float,
              origin: str = "synthetic") -> Splits:
    """Images around one random mean per class (learnable, so loss curves mean something in benchmarks).

    Sample i of a split is generated with the block of ids holding it, from the seed, the split and the
    block number only: any read range yields the same samples.
    """
    shape = tuple(int(d) for d in shape)
    if classes < 1 or any(d < 1 for d in shape):
        raise ConfigError(f"{origin}: synthetic data needs at least 1 class and a positive shape, got "
                          f"{classes} classes of shape {shape}")
    n_test = _test_count(count, test_fraction, origin)
    centers = np.random.default_rng([seed, 0]).normal(0, 1, size=(classes, *shape)).astype(np.float32)
    block = max(1, SYNTHETIC_BLOCK_BYTES // (4 * int(np.prod(shape))))

    def split(n: int, split_id: int) -> Source:
        def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            x, y = np.empty((stop - start, *shape), np.float32), np.empty(stop - start, np.int64)
            for b in range(start // block, -(-stop // block)):
                rng = np.random.default_rng([seed, split_id, b])
                block_y = rng.integers(0, classes, size=block)
                block_x = rng.standard_normal(size=(block, *shape), dtype=np.float32)
                first, last = max(start, b * block), min(stop, (b + 1) * block)
                part = slice(first - b * block, last - b * block)
                y[first - start:last - start] = block_y[part]
                np.add(centers[block_y[part]], block_x[part], out=x[first - start:last - start])
            return x, y
        return Source(n, shape, np.dtype(np.float32), classes, read)

    return {"train": split(count - n_test, 1), "test": split(n_test, 2)}


def load_npz(path: Path, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `x` and `y` of an .npz file."""
    if not path.is_file():
        raise ConfigError(f"{origin}: {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise ConfigError(f"{origin}: {path}: missing array(s) {sorted(missing)} (has {sorted(npz.files)})")
            return npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{origin}: {path}: not a readable .npz file ({exc})") from None


def _load_npy(path: Path, origin: str, **kwargs) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{origin}: {path}: not a readable .npy file ({exc})") from None


def load_npy_pairs(directory: Path, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """`x.npy`/`y.npy`, or pairs `NAME_x.npy`/`NAME_y.npy` concatenated in name order. A single pair's
    samples stay memory-mapped: only the samples read are loaded."""
    if not directory.is_dir():
        raise ConfigError(f"{origin}: {directory}: directory not found")
    xs = sorted(directory.glob("*x.npy"))
    if not xs:
        raise ConfigError(f"{origin}: {directory}: no x.npy or NAME_x.npy files")
    x_parts, y_parts = [], []
    for x_path in xs:
        y_path = x_path.with_name(x_path.name[:-5] + "y.npy")
        if not y_path.is_file():
            raise ConfigError(f"{origin}: {x_path}: no matching {y_path.name}")
        x, y = _load_npy(x_path, origin, mmap_mode="r"), _load_npy(y_path, origin)
        if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(f"{origin}: {x_path}: samples {x.shape} do not match labels {y.shape} in {y_path.name}")
        if x_parts and x.shape[1:] != x_parts[0].shape[1:]:
            raise ConfigError(f"{origin}: {x_path}: samples of shape {x.shape[1:]} disagree with "
                              f"{xs[0].name} ({x_parts[0].shape[1:]})")
        x_parts.append(x)
        y_parts.append(y)
    return (x_parts[0] if len(x_parts) == 1 else np.concatenate(x_parts)), np.concatenate(y_parts)


def hdf5_splits(spec: str, test_fraction: float, seed: int, origin: str, task: str = "classification",
                x_key: str = "x", y_key: str = "y", one_sample: bool = False) -> Splits:
    """Users' HDF5 files as a source (for `hvdtrain data shard`): samples and labels as stored, split by a
    seeded shuffle; each read gathers its samples from the files in file order."""
    from sklearn.model_selection import train_test_split

    from hvdtrain import tasks
    from hvdtrain.shards.index import open_set
    from hvdtrain.shards.plan import Segment
    from hvdtrain.shards.reader import ShardReader

    kind = tasks.get(task)
    shard_set = open_set(spec, x_key, y_key, origin=origin, one_sample=one_sample, count_classes=kind.classes)
    reader = ShardReader(shard_set, task, shard_set.num_classes if kind.classes else None)
    offsets = np.concatenate([[0], np.cumsum(shard_set.counts)])
    n_test = _test_count(shard_set.total, test_fraction, origin)
    train, test = train_test_split(np.arange(shard_set.total), test_size=n_test, random_state=seed)

    def split(ids: np.ndarray) -> Source:
        def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            wanted = ids[start:stop]
            order = np.argsort(wanted, kind="stable")
            segments = []
            for i in wanted[order]:
                shard = int(np.searchsorted(offsets, i, side="right") - 1)
                first = int(i - offsets[shard])
                if segments and segments[-1].shard == shard and segments[-1].stop == first:
                    segments[-1] = Segment(shard, segments[-1].start, first + 1)
                else:
                    segments.append(Segment(shard, first, first + 1))
            x, y = reader.read(segments)
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            return x[inverse], y[inverse]
        return Source(len(ids), tuple(shard_set.sample_shape), np.dtype(shard_set.x_dtype),
                      shard_set.num_classes if kind.classes else 0, read, tuple(shard_set.label_shape),
                      np.dtype(shard_set.y_dtype))  # labels written as stored (a uint8 mask stays uint8)

    return {"train": split(np.sort(train)), "test": split(np.sort(test))}


def open_source(spec: str, test_fraction: float, seed: int, synthetic_shape: Sequence[int] = (1, 8, 8),
                synthetic_classes: int = 10, synthetic_count: int = 2048, origin: str = "data.source",
                task: str = "classification", hdf5_options: dict | None = None) -> Splits:
    """The train and test splits of `spec`; `origin` names the setting in error messages.
    hdf5_options: x_key, y_key, one_sample for an hdf5:PATH spec."""
    if spec.startswith("hdf5:"):
        return hdf5_splits(spec[len("hdf5:"):], test_fraction, seed, origin, task, **(hdf5_options or {}))
    if spec == "digits":
        return digits(test_fraction, seed, origin)
    if spec == "synthetic":
        return synthetic(synthetic_shape, synthetic_classes, synthetic_count, seed, test_fraction, origin)
    if spec.startswith("npz:"):
        path = Path(spec[len("npz:"):])
        x, y = load_npz(path, origin)
    elif spec.startswith("npy:") or Path(spec).is_dir():
        path = Path(spec.removeprefix("npy:"))
        x, y = load_npy_pairs(path, origin)
    else:
        raise ConfigError(f"{origin}: {spec!r}: use {SPECS}")
    return array_splits(x, y, test_fraction, seed, f"{origin}: {path}", task)
