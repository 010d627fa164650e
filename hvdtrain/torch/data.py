"""PyTorch adapter for the data core: batches as tensors, shard windows read by DataLoader workers."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from hvdtrain.shards.plan import Window
from hvdtrain.shards.reader import ShardReader


class WindowDataset(TorchDataset):
    """Item i is planned window i, read and shuffled in whichever process asks for it.

    A map-style dataset keeps the windows in plan order whatever the number of workers, so a run
    is reproducible and resumable independently of `data.workers`.
    """

    def __init__(self, reader: ShardReader, windows: list[Window]):
        self.reader, self.windows = reader, windows
        self._buffers = None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        window = self.windows[i]
        if self._buffers is None or len(self._buffers[1]) < window.num_samples:
            # one read buffer per worker, reused: fresh pages for every window cost more than the read
            self._buffers = self.reader.buffers(max(w.num_samples for w in self.windows))
        raw_x, raw_y = self._buffers
        n = self.reader.read_into(window.segments, raw_x, raw_y)
        order = torch.from_numpy(window.order)
        # Gather straight into shared memory: the tensor then crosses to the trainer without a copy.
        x = torch.empty((n, *raw_x.shape[1:]), dtype=torch.from_numpy(raw_x[:0]).dtype).share_memory_()
        torch.index_select(torch.from_numpy(raw_x[:n]), 0, order, out=x)
        y = torch.from_numpy(raw_y[:n].astype(np.int64))[order]
        return x, y


def train_batches(rank_data, start_step: int, last_step: int, workers: int = 0,
                  prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for steps [start_step, last_step); with workers, windows are read ahead in other processes."""
    if rank_data.windows is None or workers == 0:
        for x, y in rank_data.batches(start_step, last_step):
            yield torch.from_numpy(x), torch.from_numpy(y)
        return
    windows = rank_data.windows(start_step, last_step)
    # forkserver: workers never inherit Horovod's threads, MPI state or open HDF5 handles.
    loader = DataLoader(WindowDataset(rank_data.train_reader, windows), batch_size=None, shuffle=False,
                        num_workers=workers, prefetch_factor=prefetch, multiprocessing_context="forkserver")
    for window, (x, y) in zip(windows, loader):
        yield from rank_data.window_batches(window, x, y, start_step, last_step)
