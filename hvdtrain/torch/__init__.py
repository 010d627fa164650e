"""PyTorch adapter: models and the Horovod training loop, and library mode for users' own Horovod scripts.

Library mode (stable names): DistributedOptimizer (hvdtrain.torch.exchange), a drop-in for Horovod's with
hvdtrain's compression; ShardDataset (hvdtrain.torch.data), the shard reader as an IterableDataset.
Imported on first use, so `import hvdtrain.torch` alone does not load torch or Horovod.
"""

_LIBRARY = {"DistributedOptimizer": "hvdtrain.torch.exchange", "ShardDataset": "hvdtrain.torch.data"}


def __getattr__(name: str):
    if name in _LIBRARY:
        import importlib

        return getattr(importlib.import_module(_LIBRARY[name]), name)
    raise AttributeError(f"module 'hvdtrain.torch' has no attribute {name!r}")
