"""What a task means for labels, losses and metrics (framework-free).

classification: one integer class per sample; segmentation: an integer class per pixel (voxel), the mask
having the sample's spatial shape; regression: float targets of any shape. The task sets the default loss
and metrics; the framework adapters map the loss names to their own functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from hvdtrain.errors import ConfigError

LOSSES = ("cross_entropy", "mse", "mae")


@dataclass(frozen=True)
class Task:
    name: str
    labels: str                  # "classes" (integers in [0, num_classes)) or "values" (floats)
    loss: str                    # the default loss
    metrics: tuple[str, ...]     # the default metrics; the first is the task's headline (CLI, quantize guard)
    allowed: tuple[str, ...]     # the built-in metrics that make sense for it

    @property
    def classes(self) -> bool:
        return self.labels == "classes"

    @property
    def label_dtype(self) -> np.dtype:
        return np.dtype(np.int64 if self.classes else np.float32)


TASKS = {
    "classification": Task("classification", "classes", "cross_entropy", ("accuracy",), ("accuracy",)),
    "segmentation": Task("segmentation", "classes", "cross_entropy", ("mean_iou", "pixel_accuracy"),
                         ("mean_iou", "pixel_accuracy")),
    "regression": Task("regression", "values", "mse", ("mse", "mae"), ("mse", "mae")),
}


def get(name: str) -> Task:
    return TASKS[name]


def loss_name(cfg) -> str:
    return cfg.train.loss or TASKS[cfg.task].loss


def metric_names(cfg) -> list[str]:
    return list(cfg.metrics or TASKS[cfg.task].metrics)


def headline(cfg) -> str:
    """The record key a run is judged by: test_<name> of the first configured metric."""
    from hvdtrain.metrics import display_name

    return f"test_{display_name(metric_names(cfg)[0])}"


def lower_is_better(key: str) -> bool:
    return key in ("test_mse", "test_mae", "test_loss")


def check_config(cfg) -> None:
    """Loss and metrics that fit the task; raised as ValueError("key: ...") for the config's one line."""
    task = TASKS[cfg.task]
    loss = cfg.train.loss
    if loss == "cross_entropy" and not task.classes:
        raise ValueError("train.loss: cross_entropy needs class labels; task regression uses mse or mae")
    if loss in ("mse", "mae") and task.classes:
        raise ValueError(f"train.loss: {loss} needs float targets; use task: regression, or cross_entropy")
    for name in cfg.metrics or ():
        if ":" not in name and name not in task.allowed:
            raise ValueError(f"metrics: {name} does not apply to task {task.name} (use {', '.join(task.allowed)})")


def check_shapes(task: Task, sample_shape: tuple[int, ...], label_shape: tuple[int, ...], origin: str,
                 hint: str = "") -> None:
    """The labels' shape per sample fits the task (sample_shape channels-first, after any layout change)."""
    if task.name == "classification" and label_shape != ():
        raise ConfigError(f"{origin}: labels have shape {label_shape} per sample, but task classification "
                          f"needs one class id per sample (task: segmentation for masks){hint}")
    if task.name == "segmentation":
        if len(sample_shape) < 3:
            # 1-D "images" are what a file of one 2-D sample looks like when read as many samples
            raise ConfigError(f"{origin}: samples of shape {tuple(sample_shape)} (channels first) have fewer than "
                              f"two spatial axes; segmentation needs (channels, height, width) or more{hint}")
        if label_shape != tuple(sample_shape[1:]):
            raise ConfigError(f"{origin}: mask shape {label_shape} does not match the samples' spatial shape "
                              f"{tuple(sample_shape[1:])} (samples {tuple(sample_shape)}, channels first){hint}")


def check_labels(task: Task, y: np.ndarray, num_classes: Optional[int], origin: str) -> None:
    """Values of a batch of labels (any shape) the task allows."""
    if y.size == 0:
        return
    if task.classes:
        if not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"{origin}: {task.name} labels must be integers (class ids), found {y.dtype}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            bad = low if low < 0 else high
            raise ConfigError(f"{origin}: label {bad} outside the class range [0, {num_classes})")
    elif not np.issubdtype(y.dtype, np.number) or not np.isfinite(y).all():
        raise ConfigError(f"{origin}: regression targets must be finite numbers ({y.dtype})")


def output_kwargs(task: Task, num_classes: int, label_shape: tuple[int, ...]) -> dict:
    """What a model factory is told about its output: num_classes, or target_shape for regression."""
    if task.classes:
        return {"num_classes": int(num_classes)}
    return {"target_shape": tuple(int(d) for d in label_shape)}
