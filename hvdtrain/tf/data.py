"""tf.data adapter for the data core: the same planned batches as the PyTorch adapter, as a tf.data.Dataset."""
from __future__ import annotations

import hvdtrain.tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf


def train_dataset(rank_data, start_step: int, last_step: int, sample_shape, x_dtype="float32",
                  prefetch: int = 2) -> tf.data.Dataset:
    """Batches for steps [start_step, last_step), read ahead by tf.data while the model computes."""
    signature = (tf.TensorSpec((None, *sample_shape), tf.as_dtype(x_dtype)), tf.TensorSpec((None,), tf.int64))
    dataset = tf.data.Dataset.from_generator(lambda: rank_data.batches(start_step, last_step),
                                             output_signature=signature)
    return dataset.prefetch(prefetch)
