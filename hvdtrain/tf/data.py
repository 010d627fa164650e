"""tf.data adapter for the data core: the same planned batches as the PyTorch adapter, as a tf.data.Dataset."""
from __future__ import annotations

import hvdtrain.tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf


def train_dataset(rank_data, start_step: int, last_step: int, sample_shape, x_dtype="float32",
                  prefetch: int = 2, label_shape=(), label_dtype="int64") -> tf.data.Dataset:
    """Batches for steps [start_step, last_step), read ahead by tf.data while the model computes."""
    signature = (tf.TensorSpec((None, *sample_shape), tf.as_dtype(x_dtype)),
                 tf.TensorSpec((None, *label_shape), tf.as_dtype(label_dtype)))
    dataset = tf.data.Dataset.from_generator(lambda: rank_data.batches(start_step, last_step),
                                             output_signature=signature)
    return dataset.prefetch(prefetch)


def shard_dataset(path, batch_size: int, epoch: int = 0, rank=None, size=None, seed: int = 0,
                  task: str = "classification", prefetch: int = 2, **data_options) -> tf.data.Dataset:
    """Library mode: this rank's batches of an HDF5 shard set (or users' HDF5 files) for `epoch`, as a
    tf.data.Dataset; the same plan as hvdtrain.torch.data.ShardDataset (see there for the arguments)."""
    from hvdtrain import tasks
    from hvdtrain.config import DataConfig
    from hvdtrain.data import Dataset
    from hvdtrain.world import world

    dataset = Dataset(DataConfig(source="hdf5", train=path, test=path, **data_options), seed, task)
    rank_data = dataset.for_rank(batch_size, world.rank if rank is None else rank, world.size if size is None else size)
    steps = rank_data.steps_per_epoch
    return train_dataset(rank_data, epoch * steps, (epoch + 1) * steps, dataset.sample_shape, prefetch=prefetch,
                         label_shape=dataset.label_shape, label_dtype=tasks.get(task).label_dtype)
