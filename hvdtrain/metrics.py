"""Metrics on the held-out set, as sums that ranks add with one allreduce (framework-free).

Each rank scores its share of the test set and keeps a fixed-length vector of sums per metric
(correct/count, a per-class confusion, squared errors...); the loop allreduces the vectors once and turns
the totals into values, so a metric covers the whole test set across ranks, whatever their number.
Outputs arrive as NumPy with the class axis at 1 (logits (N, C) or (N, C, H, W)) or as regression values.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from hvdtrain import entrypoints

BUILTIN = ("accuracy", "pixel_accuracy", "mean_iou", "mse", "mae")


class Metric(Protocol):
    width: int  # the length of its sums

    def sums(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray: ...
    def value(self, totals: np.ndarray) -> float: ...


class Accuracy:
    """Share of predictions (per sample, or per pixel for masks) equal to the label."""

    width = 2

    def sums(self, outputs, targets):
        return np.array([np.sum(outputs.argmax(1) == targets), targets.size], np.float64)

    def value(self, totals):
        return float(totals[0] / max(totals[1], 1))


class MeanIoU:
    """Intersection over union per class, averaged over the classes present in labels or predictions."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.width = 3 * num_classes  # per class: intersection, predicted, labelled

    def sums(self, outputs, targets):
        predicted, labels, c = outputs.argmax(1).ravel(), targets.ravel(), self.num_classes
        both = np.bincount(labels[predicted == labels], minlength=c)[:c]
        return np.concatenate([both, np.bincount(predicted, minlength=c)[:c],
                               np.bincount(labels, minlength=c)[:c]]).astype(np.float64)

    def value(self, totals):
        c = self.num_classes
        intersection, predicted, labelled = totals[:c], totals[c:2 * c], totals[2 * c:]
        union = predicted + labelled - intersection
        present = union > 0
        return float(np.mean(intersection[present] / union[present])) if present.any() else float("nan")


class MeanError:
    """Mean squared (power 2) or absolute (power 1) error over every target value."""

    width = 2

    def __init__(self, power: int):
        self.power = power

    def sums(self, outputs, targets):
        error = np.abs(outputs.reshape(targets.shape).astype(np.float64) - targets)
        return np.array([np.sum(error ** self.power), targets.size], np.float64)

    def value(self, totals):
        return float(totals[0] / max(totals[1], 1))


class UserMetric:
    """A user's function(outputs, targets) -> the batch's mean, weighted by the batch's samples."""

    width = 2

    def __init__(self, function: Callable):
        self.function = function

    def sums(self, outputs, targets):
        return np.array([float(self.function(outputs, targets)) * len(targets), len(targets)], np.float64)

    def value(self, totals):
        return float(totals[0] / max(totals[1], 1))


def _metric(name: str, num_classes: int) -> Metric:
    if name in ("accuracy", "pixel_accuracy"):
        return Accuracy()
    if name == "mean_iou":
        return MeanIoU(num_classes)
    if name in ("mse", "mae"):
        return MeanError(2 if name == "mse" else 1)
    return UserMetric(entrypoints.resolve(name, "metrics"))


def display_name(name: str) -> str:
    """test_<name>: a user's entry point is logged under its function's name."""
    return name.rpartition(":")[2]


class MetricSet:
    """The configured metrics: one sums vector for all of them, and their values from the totals."""

    def __init__(self, names: list[str], num_classes: int = 0):
        self.names = list(names)
        self.metrics = [_metric(name, num_classes) for name in self.names]
        self.width = sum(m.width for m in self.metrics)

    def zeros(self) -> np.ndarray:
        return np.zeros(self.width, np.float64)

    def sums(self, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return np.concatenate([m.sums(outputs, targets) for m in self.metrics]) if self.metrics else self.zeros()

    def values(self, totals) -> dict[str, float]:
        result, offset = {}, 0
        for name, metric in zip(self.names, self.metrics):
            result[f"test_{display_name(name)}"] = metric.value(np.asarray(totals[offset:offset + metric.width]))
            offset += metric.width
        return result
