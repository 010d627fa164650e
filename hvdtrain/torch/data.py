"""PyTorch adapter for the data core: batches as tensors, shard windows read by DataLoader workers."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from hvdtrain.shards.plan import Window
from hvdtrain.shards.reader import ShardReader, inverse_permutation


class WindowDataset(TorchDataset):
    """Item i is planned window i, read and shuffled in whichever process asks for it.

    A map-style dataset keeps the windows in plan order whatever the number of workers, so a run
    is reproducible and resumable independently of `data.workers`.
    """

    def __init__(self, reader: ShardReader, windows: list[Window]):
        self.reader, self.windows = reader, windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        window = self.windows[i]
        n, shard_set = window.num_samples, self.reader.shard_set
        # Read straight into shared memory in the window's shuffled order: the tensor then crosses to the
        # trainer without a copy, and the samples are copied once, from the page cache.
        x = torch.from_numpy(np.empty((0,), shard_set.x_dtype)).new_empty((n, *shard_set.sample_shape))
        x.share_memory_()
        y = np.empty((n, *shard_set.label_shape), shard_set.y_dtype)
        self.reader.read_into(window.segments, x.numpy(), y, inverse_permutation(window.order))
        return x, torch.from_numpy(y.astype(self.reader.label_dtype, copy=False))


def pinned_empty(shape, dtype) -> np.ndarray:
    """A NumPy array in page-locked memory, for host-to-GPU copies that do not block."""
    return torch.empty(tuple(shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True).numpy()


def train_batches(rank_data, start_step: int, last_step: int, workers: int = 0,
                  prefetch: int = 2, pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for steps [start_step, last_step); with workers, windows are read ahead in other processes.
    pin (GPU nodes): the shard reader's recycled batch buffers are page-locked."""
    if pin and getattr(rank_data, "train_reader", None) is not None:
        rank_data.train_reader.allocate = pinned_empty
    if rank_data.windows is None or workers == 0:
        for x, y in rank_data.batches(start_step, last_step):
            yield torch.from_numpy(x), torch.from_numpy(y)
        return
    windows = rank_data.windows(start_step, last_step)
    # forkserver: workers never inherit Horovod's threads, MPI state or open HDF5 handles.
    loader = DataLoader(WindowDataset(rank_data.train_reader, windows), batch_size=None, shuffle=False,
                        num_workers=workers, prefetch_factor=prefetch, multiprocessing_context="forkserver")
    for window, (x, y) in zip(windows, loader):
        for x_batch, y_batch in rank_data.window_batches(window, x, y, start_step, last_step):
            yield torch.as_tensor(x_batch), torch.as_tensor(y_batch)


class ShardDataset(torch.utils.data.IterableDataset):
    """Library mode: this rank's batches of an HDF5 shard set (or users' HDF5 files) for one epoch.

    The same plan as `hvdtrain train` (disjoint, balanced, shuffled shares, whole-chunk reads); rank and
    size default to the launcher's (horovodrun, mpirun, srun). Use with DataLoader(batch_size=None) and call
    set_epoch(e) before each epoch, as with DistributedSampler. `data_options` are data.* config keys
    (x_key, y_key, layout, normalize, one_sample_per_file, shuffle_buffer_mb, tail...)."""

    def __init__(self, path, batch_size: int, rank=None, size=None, seed: int = 0, task: str = "classification",
                 **data_options):
        from hvdtrain.config import DataConfig
        from hvdtrain.data import Dataset
        from hvdtrain.world import world

        super().__init__()
        dataset = Dataset(DataConfig(source="hdf5", train=path, test=path, **data_options), seed, task)
        self.rank_data = dataset.for_rank(batch_size, world.rank if rank is None else rank,
                                          world.size if size is None else size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rank_data.steps_per_epoch

    def __iter__(self):
        steps = self.rank_data.steps_per_epoch
        for x, y in self.rank_data.batches(self.epoch * steps, (self.epoch + 1) * steps):
            yield torch.from_numpy(x), torch.from_numpy(y)
