"""The model zoo in Keras (tf-keras), mirroring hvdtrain.torch.models layer for layer.

Inputs arrive channels-first, as the shards store them (N, C, H, W); a Permute layer makes them
channels-last for Keras' convolutions, so both frameworks read the same data.
"""
from __future__ import annotations

import math

import hvdtrain.tf  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

from hvdtrain.config import ModelConfig
from hvdtrain.errors import ConfigError

keras = tf.keras


def mlp(shape, classes: int, width: int, depth: int) -> keras.Model:
    layers = [keras.Input(shape), keras.layers.Flatten()]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    layers.append(keras.layers.Dense(classes))
    return keras.Sequential(layers)


def small_cnn(shape, classes: int, width: int) -> keras.Model:
    return keras.Sequential([
        keras.Input(shape), keras.layers.Permute((2, 3, 1)),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(4 * width, activation="relu"),
        keras.layers.Dense(classes),
    ])


def resnet(shape, classes: int, width: int, depth: int) -> keras.Model:
    groups = math.gcd(8, width)
    inputs = keras.Input(shape)
    x = keras.layers.Permute((2, 3, 1))(inputs)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    for _ in range(depth):
        y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        y = keras.layers.GroupNormalization(groups)(y)
        y = keras.layers.ReLU()(y)
        y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(y)
        y = keras.layers.GroupNormalization(groups)(y)
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x))


def build(cfg: ModelConfig, sample_shape: tuple[int, ...], classes: int) -> keras.Model:
    if cfg.name == "mlp":
        return mlp(sample_shape, classes, cfg.width, cfg.depth)
    if len(sample_shape) != 3:
        raise ConfigError(f"model.name: {cfg.name} needs (channels, height, width) samples, "
                          f"the data has shape {sample_shape}; use mlp")
    if cfg.name == "cnn":
        return small_cnn(sample_shape, classes, cfg.width)
    return resnet(sample_shape, classes, cfg.width, cfg.depth)
