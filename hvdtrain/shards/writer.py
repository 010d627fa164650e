"""Writing shard sets: `hvdtrain data shard`.

A source is split into train and test sets; each set is written as N HDF5 shards chunked along the
sample axis, each shard atomically (temporary file, fsync, rename), plus index.json with counts, schema
and per-shard SHA-256. Under mpirun/srun, ranks write disjoint shards and rank 0 writes the index.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from hvdtrain.errors import ConfigError
from hvdtrain.atomic import file_sha256, write_json
from hvdtrain.shards.index import FORMAT, INDEX_NAME, Shard, ShardSet

CHUNK_BYTES = 1 << 20  # default chunk: about 1 MiB of samples
WRITE_BYTES = 64 << 20  # a shard is generated and written in pieces of about this size


@dataclass
class Source:
    """`count` samples of one shape; `read(start, stop)` returns samples [start, stop) as (x, y)."""
    count: int
    sample_shape: tuple[int, ...]
    x_dtype: np.dtype
    num_classes: int
    read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def _array_source(x: np.ndarray, y: np.ndarray, num_classes: int) -> Source:
    return Source(len(y), tuple(x.shape[1:]), x.dtype, num_classes,
                  lambda a, b: (np.asarray(x[a:b]), np.asarray(y[a:b])))


def _split_arrays(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> dict[str, Source]:
    from sklearn.model_selection import train_test_split

    num_classes = int(y.max()) + 1
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError:  # a class too small to stratify: plain shuffled split
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed)
    return {"train": _array_source(x_train, y_train, num_classes),
            "test": _array_source(x_test, y_test, num_classes)}


def _synthetic(shape: tuple[int, ...], classes: int, count: int, seed: int, test_fraction: float) -> dict[str, Source]:
    # Class means shared by both splits make the task learnable; samples are generated per read,
    # so a set of any size is written without holding it in memory.
    centers = np.random.default_rng([seed, 0]).normal(0, 1, size=(classes, *shape)).astype(np.float32)
    n_test = int(round(count * test_fraction))

    def source(n: int, split_id: int) -> Source:
        def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng([seed, split_id, start])
            y = rng.integers(0, classes, size=stop - start)
            noise = rng.standard_normal(size=(stop - start, *shape), dtype=np.float32)
            return centers[y] + noise, y.astype(np.int64)
        return Source(n, shape, np.dtype(np.float32), classes, read)

    return {"train": source(count - n_test, 1), "test": source(n_test, 2)}


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"--source: {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not {"x", "y"} <= set(npz.files):
                raise ConfigError(f"--source: {path}: needs arrays 'x' and 'y', has {sorted(npz.files)}")
            return npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--source: {path}: not a readable .npz file ({exc})") from None


def _load_npy_pairs(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """`x.npy`/`y.npy`, or pairs `NAME_x.npy`/`NAME_y.npy` concatenated in name order."""
    xs = sorted(directory.glob("*x.npy"))
    if not xs:
        raise ConfigError(f"--source: {directory}: no x.npy or NAME_x.npy files")
    x_parts, y_parts = [], []
    for x_path in xs:
        y_path = x_path.with_name(x_path.name[:-5] + "y.npy")
        if not y_path.is_file():
            raise ConfigError(f"--source: {x_path}: no matching {y_path.name}")
        x_parts.append(np.load(x_path, mmap_mode="r", allow_pickle=False))
        y_parts.append(np.load(y_path, allow_pickle=False))
        if len(x_parts[-1]) != len(y_parts[-1]):
            raise ConfigError(f"--source: {x_path}: {len(x_parts[-1])} samples but {len(y_parts[-1])} labels")
    return (x_parts[0] if len(x_parts) == 1 else np.concatenate(x_parts)), np.concatenate(y_parts)


def sources(spec: str, test_fraction: float, seed: int, synthetic_shape: tuple[int, ...] = (3, 64, 64),
            synthetic_classes: int = 10, synthetic_count: int = 10000) -> dict[str, Source]:
    if spec == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        return _split_arrays(x, digits.target.astype(np.int64), test_fraction, seed)
    if spec == "synthetic":
        return _synthetic(tuple(synthetic_shape), synthetic_classes, synthetic_count, seed, test_fraction)
    if spec.startswith("npz:"):
        x, y = _load_npz(Path(spec[4:]))
    elif Path(spec).is_dir():
        x, y = _load_npy_pairs(Path(spec))
    else:
        raise ConfigError(f"--source: {spec!r}: use digits, synthetic, npz:PATH or a directory of .npy pairs")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ConfigError(f"--source: {spec}: labels must be non-negative integers")
    if len(y) < 2:
        raise ConfigError(f"--source: {spec}: needs at least 2 samples, found {len(y)}")
    return _split_arrays(x, y.astype(np.int64), test_fraction, seed)


def _write_shard(path: Path, source: Source, start: int, stop: int, chunk_samples: int,
                 compression: Optional[str], split: str) -> Shard:
    count = stop - start
    chunk = min(chunk_samples, count)
    sample_bytes = int(np.prod(source.sample_shape)) * np.dtype(source.x_dtype).itemsize
    step = max(chunk, WRITE_BYTES // max(1, sample_bytes) // chunk * chunk)  # whole chunks per write
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as handle:
        x_ds = handle.create_dataset("x", shape=(count, *source.sample_shape), dtype=source.x_dtype,
                                     chunks=(chunk, *source.sample_shape), compression=compression)
        y_ds = handle.create_dataset("y", shape=(count,), dtype=np.int64, chunks=(min(count, 1 << 16),),
                                     compression=compression)
        for first in range(0, count, step):
            last = min(count, first + step)
            x, y = source.read(start + first, start + last)
            x_ds[first:last] = x
            y_ds[first:last] = y
        handle.attrs.update({"format": FORMAT, "split": split, "count": count,
                             "num_classes": source.num_classes, "sample_shape": list(source.sample_shape),
                             "x_dtype": np.dtype(source.x_dtype).name})
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return Shard(path=path.name, count=count, sha256=file_sha256(path), chunk_samples=chunk)


def _mpi_world():
    """(comm, rank, size) when launched by mpirun/srun with several ranks, else (None, 0, 1)."""
    if not any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return None, 0, 1
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


def write_set(source: Source, out: Path, shards: int, split: str, chunk_samples: Optional[int] = None,
              compression: Optional[str] = None) -> Optional[ShardSet]:
    """Write one split; returns the set on the rank that wrote index.json (rank 0), else None."""
    if shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    if source.count < shards:
        raise ConfigError(f"--shards: {shards} shards for {source.count} {split} samples; use fewer shards")
    sample_bytes = int(np.prod(source.sample_shape)) * np.dtype(source.x_dtype).itemsize
    chunk = chunk_samples or max(1, CHUNK_BYTES // max(1, sample_bytes))
    comm, rank, size = _mpi_world()
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, source.count, shards + 1).astype(np.int64)
    written = [(i, _write_shard(out / f"shard-{i:05d}.h5", source, int(bounds[i]), int(bounds[i + 1]),
                                chunk, compression, split))
               for i in range(rank, shards, size)]
    if comm is not None:
        written = [item for part in comm.allgather(written) for item in part]
    if rank != 0:
        return None
    shard_set = ShardSet(root=out, shards=[s for _, s in sorted(written, key=lambda item: item[0])],
                         sample_shape=tuple(source.sample_shape), x_dtype=np.dtype(source.x_dtype).name,
                         y_dtype="int64", num_classes=source.num_classes, split=split,
                         extra={"compression": compression or "none"})
    write_json(out / INDEX_NAME, shard_set.to_json())
    return shard_set
