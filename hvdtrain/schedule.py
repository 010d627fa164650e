"""Learning-rate schedule: the rate scaled with the number of ranks, warmed up over epochs, then decayed.

Goyal et al. (2017) scale SGD's rate linearly with the global batch and ramp up to it over the first
epochs; Adam-type optimizers scale with the square root. The warm-up is a span of data (epochs), so it
lasts more steps as ranks grow and each step's share of the data shrinks.
"""
import math

from hvdtrain.config import TrainConfig

SCALE = {"linear": lambda ranks: ranks, "sqrt": math.sqrt, "none": lambda ranks: 1}


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    return cfg.lr * SCALE[cfg.scale_lr](world_size)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return round(cfg.warmup_epochs * total_steps / cfg.epochs)


def learning_rate(cfg: TrainConfig, step: int, world_size: int, total_steps: int) -> float:
    """The rate at `step` of a schedule `total_steps` long (`epochs` of them at this world size)."""
    target, ramp = scaled_lr(cfg, world_size), warmup_steps(cfg, total_steps)
    if step < ramp:
        # From the single-rank lr up to the scaled lr: large scaled rates diverge on the first steps.
        return cfg.lr + (target - cfg.lr) * step / ramp
    if cfg.schedule == "constant":
        return target
    decay_steps = max(1, total_steps - ramp)
    progress = min(1.0, (step - ramp) / decay_steps)
    return target * 0.5 * (1 + math.cos(math.pi * progress))
