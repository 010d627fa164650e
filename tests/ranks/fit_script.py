"""hvdtrain.fit from a user's Python script: a torch module or a Keras model, NumPy arrays, a dict config.

Usage: fit_script.py torch|keras RUN_DIR
"""
import sys

import numpy as np
from sklearn.datasets import load_digits

import hvdtrain


def main() -> None:
    which, run_dir = sys.argv[1], sys.argv[2]
    digits = load_digits()
    x, y = (digits.images / 16).astype(np.float32)[:, None], digits.target
    if which == "torch":
        import torch

        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        loss = torch.nn.CrossEntropyLoss()
    else:
        import tensorflow as tf

        model = tf.keras.Sequential([tf.keras.Input((1, 8, 8)), tf.keras.layers.Flatten(),
                                     tf.keras.layers.Dense(32, activation="relu"), tf.keras.layers.Dense(10)])
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    summary = hvdtrain.fit(model=model, loss=loss, train=(x_train, y_train), test=(x_test, y_test),
                           config={"train": {"epochs": 10, "optimizer": "adam", "lr": 0.01}},
                           overrides=["compression.method=fp16"], run_dir=run_dir)
    print(f"fit: {summary['framework']} test_accuracy {summary['final']['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
