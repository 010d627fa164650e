"""Model zoo: an MLP, a small CNN for 8x8 digits, and a ResNet-style CNN for benchmarks.

No BatchNorm: its statistics are per rank, which would make data-parallel training differ from
single-process training; the ResNet uses GroupNorm, which does not depend on the batch.
"""
from __future__ import annotations

import math

from torch import nn

from hvdtrain.config import ModelConfig
from hvdtrain.errors import ConfigError


def mlp(in_features: int, classes: int, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if depth else in_features, classes))
    return nn.Sequential(*layers)


def small_cnn(channels: int, classes: int, width: int, spatial: tuple[int, int]) -> nn.Module:
    h, w = spatial[0] // 2, spatial[1] // 2
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * h * w, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, classes),
    )


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        groups = math.gcd(8, width)
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width),
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.body(x))


def resnet(channels: int, classes: int, width: int, depth: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        *[ResidualBlock(width) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, classes),
    )


def build(cfg: ModelConfig, sample_shape: tuple[int, ...], classes: int) -> nn.Module:
    if cfg.name == "mlp":
        return mlp(math.prod(sample_shape), classes, cfg.width, cfg.depth)
    if len(sample_shape) != 3:
        raise ConfigError(f"model.name: {cfg.name} needs (channels, height, width) samples, "
                          f"the data has shape {sample_shape}; use mlp")
    if cfg.name == "cnn":
        return small_cnn(sample_shape[0], classes, cfg.width, sample_shape[1:])
    return resnet(sample_shape[0], classes, cfg.width, cfg.depth)
