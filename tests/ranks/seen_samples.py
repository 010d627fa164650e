"""Rank program for tests: read one epoch of a shard set through the real trainer path and report ids.

Each sample's x holds its own id (see tests/test_shards.py), so rank 0 can check what every rank saw.
Usage: seen_samples.py TRAIN_DIR TEST_DIR BATCH WORKERS OUT_JSON
"""
import json
import sys

import horovod.torch as hvd

from hvdtrain.config import DataConfig
from hvdtrain.data import Dataset
from hvdtrain.torch.data import train_batches


def main() -> None:
    train, test, batch, workers, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    hvd.init()
    dataset = Dataset(DataConfig(source="hdf5", train=train, test=test, workers=workers, shuffle_buffer_mb=0.01), seed=3)
    rank_data = dataset.for_rank(batch, hvd.rank(), hvd.size())
    steps = rank_data.steps_per_epoch
    seen = []
    for x, _ in train_batches(rank_data, 0, steps, workers=workers):
        seen.append(x.reshape(len(x), -1)[:, 0].long().tolist())
    everyone = hvd.allgather_object({"rank": hvd.rank(), "batches": seen}, name="seen")
    if hvd.rank() == 0:
        with open(out, "w") as handle:
            json.dump(everyone, handle)


if __name__ == "__main__":  # DataLoader workers (forkserver) re-import this module
    main()
