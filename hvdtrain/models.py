"""Which model a run trains: the user's factory (model.factory) or a zoo name (model.name), called the same way.

A factory is `function(sample_shape, num_classes=... | target_shape=..., **model.kwargs)`: sample_shape is
channels first, after any layout conversion; classification and segmentation get num_classes, regression
target_shape. The zoo (hvdtrain.torch.models, hvdtrain.tf.models) is factories of that kind, given
model.width and model.depth. The framework adapters check that the result is their framework's model.
"""
from __future__ import annotations

import importlib
import math
from typing import Any

from hvdtrain import entrypoints, tasks
from hvdtrain.errors import ConfigError

ZOO = {"torch": "hvdtrain.torch.models", "tensorflow": "hvdtrain.tf.models"}


def groups(width: int) -> int:
    """GroupNorm groups for `width` channels."""
    return math.gcd(8, width)


def needs_image(name: str, sample_shape, dims: int = 2) -> None:
    if len(sample_shape) != dims + 1:
        what = "(channels, height, width)" if dims == 2 else "(channels, depth, height, width)"
        raise ConfigError(f"model.name: {name} needs {what} samples, the data has shape {tuple(sample_shape)}")


def check_unet(sample_shape, num_classes, depth: int) -> None:
    """What both frameworks' U-Nets need: an image, classes per pixel, sides that `depth` poolings halve."""
    needs_image("unet", sample_shape)
    if not num_classes:
        raise ConfigError("model.name: unet predicts a class per pixel: use it with task: segmentation")
    if any(d % 2 ** depth for d in sample_shape[1:]):
        raise ConfigError(f"model.depth: unet with depth {depth} needs height and width divisible by "
                          f"{2 ** depth}, the samples are {tuple(sample_shape[1:])}")


def source(cfg) -> str:
    """The factory a config names, for messages and reports."""
    return cfg.model.factory or f"{ZOO[cfg.framework]}:{cfg.model.name}"


def build(cfg, sample_shape, num_classes: int, label_shape) -> Any:
    """Call the configured factory; any failure in it is one line naming the key."""
    if cfg.model.factory:
        key, factory = "model.factory", entrypoints.resolve(cfg.model.factory, "model.factory")
        kwargs = dict(cfg.model.kwargs)
    else:
        key = "model.name"
        factory = getattr(importlib.import_module(ZOO[cfg.framework]), cfg.model.name)
        kwargs = {"width": cfg.model.width, "depth": cfg.model.depth, **cfg.model.kwargs}
    kwargs.update(sample_shape=tuple(int(d) for d in sample_shape),
                  **tasks.output_kwargs(tasks.get(cfg.task), num_classes, tuple(label_shape)))
    try:
        model = factory(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{key}: {source(cfg)}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) raised "
                          f"{type(exc).__name__}: {exc}") from None
    if model is None:
        raise ConfigError(f"{key}: {source(cfg)} returned None instead of a model")
    return model
