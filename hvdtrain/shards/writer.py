"""Writing shard sets: `hvdtrain data shard`.

A source (hvdtrain.sources: the same samples training reads in memory) is written as train and test
sets, each of N HDF5 shards chunked along the sample axis, each shard atomically (hvdtrain.atomic), plus
index.json with counts, schema and per-shard SHA-256. In a job of several ranks (mpirun, srun), ranks
write disjoint shards, MPI gathers what each wrote, and rank 0 writes the index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from hvdtrain.atomic import atomic_path, file_sha256, write_json
from hvdtrain.errors import ConfigError
from hvdtrain.shards.index import FORMAT, INDEX_NAME, Shard, ShardSet
from hvdtrain.sources import Source, Splits
from hvdtrain.world import world

CHUNK_BYTES = 1 << 20  # default chunk: about 1 MiB of samples
WRITE_BYTES = 64 << 20  # a shard is generated and written in pieces of about this size


def _write_shard(path: Path, source: Source, start: int, stop: int, chunk_samples: int,
                 compression: Optional[str], split: str) -> Shard:
    count = stop - start
    chunk = min(chunk_samples, count)
    sample_bytes = int(np.prod(source.sample_shape)) * np.dtype(source.x_dtype).itemsize
    step = max(chunk, WRITE_BYTES // max(1, sample_bytes) // chunk * chunk)  # whole chunks per write
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        x_ds = handle.create_dataset("x", shape=(count, *source.sample_shape), dtype=source.x_dtype,
                                     chunks=(chunk, *source.sample_shape), compression=compression)
        label_shape = tuple(source.label_shape)
        label_chunk = min(count, max(1, (1 << 16) // max(1, int(np.prod(label_shape)))))
        y_ds = handle.create_dataset("y", shape=(count, *label_shape), dtype=source.y_dtype,
                                     chunks=(label_chunk, *label_shape), compression=compression)
        for first in range(0, count, step):
            last = min(count, first + step)
            x, y = source.read(start + first, start + last)
            x_ds[first:last] = x
            y_ds[first:last] = y
        handle.attrs.update({"format": FORMAT, "split": split, "count": count,
                             "num_classes": source.num_classes, "sample_shape": list(source.sample_shape),
                             "x_dtype": np.dtype(source.x_dtype).name})
    return Shard(path=path.name, count=count, sha256=file_sha256(path), chunk_samples=chunk)


def _comm():
    """MPI's COMM_WORLD, to gather the shards each rank wrote, in a job of several ranks; else None."""
    if world.size == 1:
        return None
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() != world.size:
        raise ConfigError(f"data shard: the launcher started {world.size} ranks but MPI sees "
                          f"{MPI.COMM_WORLD.Get_size()}; launch with mpirun or srun, or run one process")
    return MPI.COMM_WORLD


def write_set(source: Source, out: Path, shards: int, split: str, chunk_samples: Optional[int] = None,
              compression: Optional[str] = None) -> Optional[ShardSet]:
    """Write one split; returns the set on the rank that wrote index.json (rank 0), else None."""
    if shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    if source.count < shards:
        raise ConfigError(f"--shards: {shards} shards for {source.count} {split} samples; use fewer shards")
    if chunk_samples is not None and chunk_samples < 1:
        raise ConfigError(f"--chunk-samples: must be at least 1, got {chunk_samples}")
    sample_bytes = int(np.prod(source.sample_shape)) * np.dtype(source.x_dtype).itemsize
    chunk = chunk_samples or max(1, CHUNK_BYTES // max(1, sample_bytes))
    comm = _comm()
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, source.count, shards + 1).astype(np.int64)
    written = [(i, _write_shard(out / f"shard-{i:05d}.h5", source, int(bounds[i]), int(bounds[i + 1]),
                                chunk, compression, split))
               for i in range(world.rank, shards, world.size)]
    if comm is not None:
        written = [item for part in comm.allgather(written) for item in part]
    if world.rank != 0:
        return None
    shard_set = ShardSet(root=out, shards=[s for _, s in sorted(written, key=lambda item: item[0])],
                         sample_shape=tuple(source.sample_shape), x_dtype=np.dtype(source.x_dtype).name,
                         y_dtype=np.dtype(source.y_dtype).name, num_classes=source.num_classes, split=split,
                         extra={"compression": compression or "none"}, label_shape=tuple(source.label_shape))
    write_json(out / INDEX_NAME, shard_set.to_json())
    return shard_set


def write_splits(splits: Splits, out: Path, shards: int, chunk_samples: Optional[int] = None,
                 compression: Optional[str] = None) -> dict[str, Optional[ShardSet]]:
    """Write each split to out/SPLIT: the train set in `shards` shards, a test set in as many but never
    more than it has samples (a small test set is still written). Returns write_set's result per split."""
    if shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    return {split: write_set(source, out / split, shards if split == "train" else min(shards, source.count),
                             split, chunk_samples, compression)
            for split, source in splits.items()}

