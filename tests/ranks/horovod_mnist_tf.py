"""A user's own Horovod script, written like Horovod's examples/tensorflow2/tensorflow2_mnist.py, on the digits.

Usage: horovod_mnist_tf.py SHARDS_DIR horovod|topk OUT_JSON
The training step is a tf.function with the tape wrapped by Horovod's DistributedGradientTape, or by
hvdtrain's drop-in with top-k; the data come from hvdtrain's shard reader (shard_dataset) in both.
"""
import json
import sys

import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

import hvdtrain.tf
from hvdtrain.config import CompressionConfig


def main() -> None:
    shards, which, out = sys.argv[1], sys.argv[2], sys.argv[3]
    hvd.init()
    tf.keras.utils.set_random_seed(42)
    model = tf.keras.Sequential([
        tf.keras.Input((1, 8, 8)), tf.keras.layers.Permute((2, 3, 1)),
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(2), tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(10)])
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = tf.keras.optimizers.SGD(0.02 * hvd.size(), momentum=0.9)
    compression = CompressionConfig(method="topk", ratio=0.05, min_size=1000)

    @tf.function
    def training_step(images, labels, first_batch):
        with tf.GradientTape() as tape:
            loss_value = loss(labels, model(images, training=True))
        if which == "horovod":
            tape = hvd.DistributedGradientTape(tape)
        else:
            tape = hvdtrain.tf.DistributedGradientTape(tape, compression=compression)
        grads = tape.gradient(loss_value, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        if first_batch:
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(opt.variables, root_rank=0)
        return loss_value

    step = 0
    for epoch in range(8):
        for images, labels in hvdtrain.tf.shard_dataset(f"{shards}/train", batch_size=32, epoch=epoch, seed=42):
            training_step(images, labels, step == 0)
            step += 1
    correct, count = 0.0, 0.0
    for images, labels in hvdtrain.tf.shard_dataset(f"{shards}/test", batch_size=8, seed=0, tail="pad"):
        correct += float(np.sum(np.argmax(model(images).numpy(), 1) == labels.numpy()))
        count += len(labels)
    totals = hvd.allreduce(tf.constant([correct, count], tf.float64), op=hvd.Sum, name="accuracy").numpy()
    digest = hvd.allgather_object(float(sum(np.sum(w, dtype=np.float64) for w in model.get_weights())))
    if hvd.rank() == 0:
        with open(out, "w") as handle:
            json.dump({"accuracy": float(totals[0] / totals[1]), "ranks_equal": len(set(digest)) == 1}, handle)


if __name__ == "__main__":
    main()
