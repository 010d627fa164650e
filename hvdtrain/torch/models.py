"""The built-in model zoo, each a model factory of the kind users write (hvdtrain.models).

A factory takes `sample_shape` (channels first), `num_classes` (classification, segmentation) or
`target_shape` (regression), and its own keyword arguments; it returns an nn.Module. hvdtrain.tf.models
mirrors this file layer for layer. unet and cnn3d are the reference science workloads: DeepCAM-style
per-pixel segmentation and CosmoFlow-style regression of a 3-D volume to a few parameters.

No BatchNorm: its statistics are per rank, which would make data-parallel training differ from
single-process training; the ResNet, U-Net and 3-D CNN use GroupNorm, which does not depend on the batch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from hvdtrain.models import check_unet, groups as _groups, needs_image as _needs_image


def _outputs(num_classes: Optional[int], target_shape: Optional[Sequence[int]]) -> tuple[int, list[nn.Module]]:
    """Output features of a model's last layer, and the layer shaping them into the targets."""
    if num_classes:
        return num_classes, []
    shape = tuple(target_shape or (1,))
    return math.prod(shape), ([nn.Unflatten(1, shape)] if len(shape) != 1 else [])


def mlp(sample_shape, num_classes=None, target_shape=None, width: int = 32, depth: int = 2) -> nn.Module:
    out, shape = _outputs(num_classes, target_shape)
    in_features = math.prod(sample_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if depth else in_features, out))
    return nn.Sequential(*layers, *shape)


def cnn(sample_shape, num_classes=None, target_shape=None, width: int = 32, depth: int = 2) -> nn.Module:
    """A small CNN for 8x8 digits (two convolutions, one pooling)."""
    _needs_image("cnn", sample_shape)
    out, shape = _outputs(num_classes, target_shape)
    channels, h, w = sample_shape[0], sample_shape[1] // 2, sample_shape[2] // 2
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * h * w, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, out), *shape,
    )


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(_groups(width), width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(_groups(width), width),
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.body(x))


def resnet(sample_shape, num_classes=None, target_shape=None, width: int = 32, depth: int = 2) -> nn.Module:
    _needs_image("resnet", sample_shape)
    out, shape = _outputs(num_classes, target_shape)
    return nn.Sequential(
        nn.Conv2d(sample_shape[0], width, 3, padding=1), nn.ReLU(),
        *[ResidualBlock(width) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, out), *shape,
    )


def _double_conv(conv, norm, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c_out, 3, padding=1, bias=False), norm(_groups(c_out), c_out), nn.ReLU(),
                         conv(c_out, c_out, 3, padding=1, bias=False), norm(_groups(c_out), c_out), nn.ReLU())


class UNet(nn.Module):
    """Encoder-decoder with skip connections (Ronneberger et al.), `depth` poolings; logits (N, classes, H, W)."""

    def __init__(self, channels: int, classes: int, width: int, depth: int):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(nn.Conv2d, nn.GroupNorm, channels, widths[0])] +
                                  [_double_conv(nn.Conv2d, nn.GroupNorm, widths[i], widths[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_double_conv(nn.Conv2d, nn.GroupNorm, 2 * widths[i], widths[i])
                                    for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def unet(sample_shape, num_classes=None, target_shape=None, width: int = 16, depth: int = 2) -> nn.Module:
    check_unet(sample_shape, num_classes, depth)
    return UNet(sample_shape[0], num_classes, width, depth)


def cnn3d(sample_shape, num_classes=None, target_shape=None, width: int = 16, depth: int = 3) -> nn.Module:
    """CosmoFlow-style 3-D CNN: `depth` blocks of convolution and pooling, global average, two dense layers.
    No normalisation layers, as in the MLPerf reference: per-sample normalisation would remove the
    volume's mean density, which is what the parameters set."""
    _needs_image("cnn3d", sample_shape, dims=3)
    out, shape = _outputs(num_classes, target_shape)
    layers: list[nn.Module] = []
    channels = sample_shape[0]
    for i in range(depth):
        layers += [nn.Conv3d(channels, width * 2 ** i, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool3d(2)]
        channels = width * 2 ** i
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                         nn.Linear(channels, 4 * width), nn.LeakyReLU(0.1), nn.Linear(4 * width, out), *shape)
