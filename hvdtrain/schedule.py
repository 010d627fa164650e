"""Learning-rate schedule: linear scaling by world size with warm-up (Goyal et al. 2017)."""
import math

from hvdtrain.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int, world_size: int, total_steps: int) -> float:
    target = cfg.lr * (world_size if cfg.scale_lr else 1)
    if step < cfg.warmup_steps:
        # Ramp from the single-rank lr to the scaled lr: large scaled lrs diverge on the first steps.
        return cfg.lr + (target - cfg.lr) * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return target
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return target * 0.5 * (1 + math.cos(math.pi * progress))
