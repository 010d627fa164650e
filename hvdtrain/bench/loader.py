"""`hvdtrain bench loader`: shard reader throughput against the raw read limit and a naive loader.

All loaders read the same synthetic HDF5 set (3x64x64 float32 by default) after one warm-up pass, so
each is measured on the same page-cache state; ratios come from the same run.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from hvdtrain.config import DataConfig
from hvdtrain.data import Dataset
from hvdtrain.atomic import write_json
from hvdtrain.bench import Targets
from hvdtrain import sources
from hvdtrain.shards import writer
from hvdtrain.shards.index import INDEX_NAME, open_set


def ensure_set(directory: Path, size_gb: float, shape: tuple[int, ...], shards: int) -> Path:
    sample_bytes = int(np.prod(shape)) * 4
    count = math.ceil(size_gb * 2**30 / sample_bytes)
    train = directory / "train"
    if (train / INDEX_NAME).is_file() and json.loads((train / INDEX_NAME).read_text())["total"] == count:
        return train
    print(f"writing {count} samples of {shape} float32 ({size_gb:g} GiB) to {train} ...", flush=True)
    # a test fraction of 1 in count + 1 leaves exactly `count` training samples
    source = sources.synthetic(shape, 10, count + 1, 0, 1 / (count + 1))["train"]
    writer.write_set(source, train, shards, "train")
    return train


def _timed(batches: Iterator, limit_s: float) -> tuple[int, float]:
    """Samples and seconds from the first batch on: start-up (worker processes) is reported apart."""
    batches = iter(batches)
    next(batches)
    samples, started = 0, time.perf_counter()
    for x, _ in batches:
        samples += len(x)
        if time.perf_counter() - started > limit_s:
            break
    return samples, time.perf_counter() - started


def raw_read(train: Path, epochs: int = 1) -> Iterator[tuple[np.ndarray, None]]:
    """The limit: every shard read sequentially, one HDF5 chunk per call, no shuffling, no batching."""
    shard_set = open_set(str(train))
    for i in list(range(len(shard_set.shards))) * epochs:
        with h5py.File(shard_set.shard_path(i), "r") as handle:
            x = handle["x"]
            chunk = x.chunks[0]
            buffer = np.empty((chunk, *x.shape[1:]), x.dtype)
            for start in range(0, x.shape[0], chunk):
                n = min(chunk, x.shape[0] - start)
                x.read_direct(buffer, np.s_[start:start + n], np.s_[0:n])
                yield buffer[:n], None


class PerSampleDataset:
    """What users write first: a map-style Dataset doing `ds[i]` per sample (files opened lazily)."""

    def __init__(self, train: Path):
        self.shard_set = open_set(str(train))
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_set.counts)])
        self.files: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        import torch

        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if shard not in self.files:
            self.files[shard] = h5py.File(self.shard_set.shard_path(shard), "r")
        handle, local = self.files[shard], i - int(self.offsets[shard])
        return torch.from_numpy(handle["x"][local]), int(handle["y"][local])


def naive_loader(train: Path, batch: int, workers: int):
    """The naive dataset shuffled by a DataLoader, as in most tutorials."""
    import torch

    return torch.utils.data.DataLoader(PerSampleDataset(train), batch_size=batch, shuffle=True,
                                       num_workers=workers, multiprocessing_context="forkserver" if workers else None)


def hvdtrain_loader(train: Path, batch: int, workers: int, buffer_mb: float, epochs: int = 1):
    from hvdtrain.torch.data import train_batches

    dataset = Dataset(DataConfig(source="hdf5", train=str(train), test=str(train), workers=workers,
                                 shuffle_buffer_mb=buffer_mb), seed=0)
    rank_data = dataset.for_rank(batch, 0, 1)
    return train_batches(rank_data, 0, epochs * rank_data.steps_per_epoch, workers=workers)


def run(directory: Path, size_gb: float, batch: int, workers: list[int], naive_seconds: float,
        buffer_mb: float, epochs: int, out: Path | None) -> dict:
    import torch

    torch.set_num_threads(1)
    train = ensure_set(directory, size_gb, (3, 64, 64), 8)
    # Several epochs, as in training: one-time costs (buffers, worker start-up) are amortised alike.
    measure: dict[str, Callable[[], Iterator]] = {"raw sequential read (limit)": lambda: raw_read(train, epochs)}
    for w in workers:
        measure[f"hvdtrain shuffled, workers={w}"] = (lambda w=w: hvdtrain_loader(train, batch, w, buffer_mb, epochs))
    for w in workers:
        measure[f"naive ds[i], workers={w}"] = (lambda w=w: naive_loader(train, batch, w))
    _timed(raw_read(train), float("inf"))  # warm-up: the same page-cache state for everyone
    results = {}
    for name, make in measure.items():
        limit = naive_seconds if name.startswith("naive") else float("inf")
        samples, seconds = _timed(make(), limit)
        results[name] = {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}
        print(f"{name:34s} {samples / seconds:10.0f} samples/s  ({samples} samples in {seconds:.1f} s)", flush=True)
    limit = results["raw sequential read (limit)"]["samples_per_s"]
    targets = Targets()
    report = {"set": str(train), "size_gb": size_gb, "batch": batch, "shuffle_buffer_mb": buffer_mb, "epochs": epochs,
              "results": results, "ratios": {}}
    for w in workers:
        ours = results[f"hvdtrain shuffled, workers={w}"]["samples_per_s"]
        report["ratios"][f"workers={w}"] = {
            "vs_raw": ours / limit, "vs_naive_same_workers": ours / results[f"naive ds[i], workers={w}"]["samples_per_s"]}
        vs_naive = report["ratios"][f"workers={w}"]["vs_naive_same_workers"]
        print(f"workers={w}: hvdtrain / raw = {ours / limit:.2f}x "
              f"{targets.check(f'workers={w} hvdtrain / raw read', ours / limit, '>=', 0.8)}, hvdtrain / naive = "
              f"{vs_naive:.1f}x {targets.check(f'workers={w} hvdtrain / naive loader', vs_naive, '>=', 10)}")
    report["targets"] = targets.checked
    if out:
        write_json(out, report)
    return report
