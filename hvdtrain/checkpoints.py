"""Checkpoint files in a run directory: naming, finding the latest, keeping the last K."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from hvdtrain.errors import ConfigError

_NAME = re.compile(r"^ckpt-(\d{8})\.(pt|npz)$")


def directory(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def path_for(run_dir: Path, step: int, suffix: str = "pt") -> Path:
    return directory(run_dir) / f"ckpt-{step:08d}.{suffix}"


def existing(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of an interrupted write are ignored)."""
    folder = directory(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve(run_dir: Path, resume: str) -> Optional[Path]:
    """`--resume`: 'none' starts fresh, 'auto' takes the latest checkpoint if any, else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = existing(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume: {path}: checkpoint not found")
    return path


def prune(run_dir: Path, keep: int) -> None:
    for old in existing(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
