"""The model zoo in Keras (tf-keras), mirroring hvdtrain.torch.models factory for factory.

Inputs arrive channels-first, as hvdtrain hands every model its batches (N, C, H, W) or (N, C, D, H, W); a
Permute layer makes them channels-last for Keras' convolutions, so both frameworks read the same data.
Segmentation logits come out channels-last, (N, H, W, classes), as Keras' losses expect.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import hvdtrain.tf  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

from hvdtrain.models import check_unet, groups as _groups, needs_image as _needs_image

keras = tf.keras


def _head(x, num_classes: Optional[int], target_shape: Optional[Sequence[int]]):
    if num_classes:
        return keras.layers.Dense(num_classes)(x)
    shape = tuple(target_shape or (1,))
    x = keras.layers.Dense(math.prod(shape))(x)
    return keras.layers.Reshape(shape)(x) if len(shape) != 1 else x


def _channels_last(inputs):
    rank = len(inputs.shape) - 1
    return keras.layers.Permute((*range(2, rank + 1), 1))(inputs) if rank >= 3 else inputs


def mlp(sample_shape, num_classes=None, target_shape=None, width: int = 32, depth: int = 2) -> keras.Model:
    inputs = keras.Input(tuple(sample_shape))
    x = keras.layers.Flatten()(inputs)
    for _ in range(depth):
        x = keras.layers.Dense(width, activation="relu")(x)
    return keras.Model(inputs, _head(x, num_classes, target_shape))


def cnn(sample_shape, num_classes=None, target_shape=None, width: int = 32, depth: int = 2) -> keras.Model:
    _needs_image("cnn", sample_shape)
    inputs = keras.Input(tuple(sample_shape))
    x = _channels_last(inputs)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4 * width, activation="relu")(x)
    return keras.Model(inputs, _head(x, num_classes, target_shape))


def resnet(sample_shape, num_classes=None, target_shape=None, width: int = 32, depth: int = 2) -> keras.Model:
    _needs_image("resnet", sample_shape)
    inputs = keras.Input(tuple(sample_shape))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(_channels_last(inputs))
    for _ in range(depth):
        y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        y = keras.layers.GroupNormalization(_groups(width))(y)
        y = keras.layers.ReLU()(y)
        y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(y)
        y = keras.layers.GroupNormalization(_groups(width))(y)
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _head(x, num_classes, target_shape))


def _double_conv(x, width: int):
    for _ in range(2):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.GroupNormalization(_groups(width))(x)
        x = keras.layers.ReLU()(x)
    return x


def unet(sample_shape, num_classes=None, target_shape=None, width: int = 16, depth: int = 2) -> keras.Model:
    check_unet(sample_shape, num_classes, depth)
    inputs = keras.Input(tuple(sample_shape))
    x, skips = _channels_last(inputs), []
    for i in range(depth + 1):
        x = _double_conv(x if i == 0 else keras.layers.MaxPooling2D(2)(x), width * 2 ** i)
        skips.append(x)
    skips.pop()
    for i in reversed(range(depth)):
        up = keras.layers.Conv2DTranspose(width * 2 ** i, 2, strides=2)(x)
        x = _double_conv(keras.layers.Concatenate()([up, skips.pop()]), width * 2 ** i)
    return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1)(x))


def cnn3d(sample_shape, num_classes=None, target_shape=None, width: int = 16, depth: int = 3) -> keras.Model:
    _needs_image("cnn3d", sample_shape, dims=3)
    inputs = keras.Input(tuple(sample_shape))
    x = _channels_last(inputs)
    for i in range(depth):
        x = keras.layers.Conv3D(width * 2 ** i, 3, padding="same")(x)  # no normalisation (see the torch twin)
        x = keras.layers.LeakyReLU(0.1)(x)
        x = keras.layers.MaxPooling3D(2)(x)
    x = keras.layers.GlobalAveragePooling3D()(x)
    x = keras.layers.LeakyReLU(0.1)(keras.layers.Dense(4 * width)(x))
    return keras.Model(inputs, _head(x, num_classes, target_shape))
