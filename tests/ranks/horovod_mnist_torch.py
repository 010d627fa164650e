"""A user's own Horovod script, written like Horovod's examples/pytorch/pytorch_mnist.py, on the digits.

Usage: horovod_mnist_torch.py SHARDS_DIR horovod|topk OUT_JSON
Only two lines differ between the two runs: the optimizer (Horovod's, or hvdtrain's drop-in with top-k)
and nothing else; the data come from hvdtrain's shard reader (ShardDataset) in both, and rank 0 saves the
model with hvdtrain's atomic checkpoint helper.
"""
import json
import sys

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn

import hvdtrain.torch
from hvdtrain.atomic import atomic_open
from hvdtrain.config import CompressionConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def main() -> None:
    shards, which, out = sys.argv[1], sys.argv[2], sys.argv[3]
    hvd.init()
    torch.manual_seed(42)
    torch.set_num_threads(1)
    train_set = hvdtrain.torch.ShardDataset(f"{shards}/train", batch_size=32, seed=42)
    test_set = hvdtrain.torch.ShardDataset(f"{shards}/test", batch_size=8, seed=0, tail="pad")
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=None)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02 * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    if which == "horovod":
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=hvd.Compression.none)
    else:
        optimizer = hvdtrain.torch.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                        compression=CompressionConfig(method="topk", ratio=0.05,
                                                                                      min_size=1000))
    for epoch in range(8):
        train_set.set_epoch(epoch)
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    correct, count = 0.0, 0.0
    with torch.no_grad():
        for x, y in test_set:
            correct += float((model(x).argmax(1) == y).sum())
            count += len(y)
    totals = hvd.allreduce(torch.tensor([correct, count], dtype=torch.float64), op=hvd.Sum, name="accuracy")
    digest = hvd.allgather_object(float(sum(p.double().sum() for p in model.parameters())))
    if hvd.rank() == 0:
        with atomic_open(f"{out}.pt") as handle:
            torch.save(model.state_dict(), handle)
        stats = optimizer.exchange_stats() if which != "horovod" else {}
        with open(out, "w") as handle:
            json.dump({"accuracy": float(totals[0] / totals[1]), "ranks_equal": len(set(digest)) == 1,
                       "bytes_per_step": stats.get("bytes_per_step"), "steps_per_epoch": len(train_set)}, handle)


if __name__ == "__main__":
    main()
