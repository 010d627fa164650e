"""Checkpoint files in a run directory: naming, integrity, finding the latest good one, keeping the last K.

Each checkpoint is written atomically and followed by a `.sha256` file. A checkpoint whose digest is
missing or wrong (a crash between the two writes, a damaged disk) is skipped on resume in favour of the
previous one, with a warning.

State that differs between ranks (top-k's error-feedback residual, corrected momentum) is written by each
rank beside the checkpoint, `ckpt-STEP.rank-R.npz`, before rank 0 writes and seals the checkpoint itself.
Per-rank files keep the checkpoint's size independent of the number of ranks.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

from hvdtrain.errors import ConfigError
import numpy as np

from hvdtrain.atomic import atomic_open, file_sha256, write_text

_NAME = re.compile(r"^ckpt-(\d{8})\.(pt|npz)$")


def directory(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def path_for(run_dir: Path, step: int, suffix: str = "pt") -> Path:
    return directory(run_dir) / f"ckpt-{step:08d}.{suffix}"


def write(run_dir: Path, step: int, suffix: str, save: Callable[[Path, dict], None], meta: dict,
          keep: int) -> Path:
    """Rank 0's checkpoint at `step`: written (atomically) by `save`, sealed with its digest, the
    oldest beyond `keep` removed."""
    path = path_for(run_dir, step, suffix)
    save(path, {"step": step, **meta})
    seal(path)
    prune(run_dir, keep)
    return path


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def seal(path: Path) -> None:
    """Record the digest of a checkpoint just written (atomically, after the checkpoint itself)."""
    write_text(_digest_file(path), file_sha256(path) + "\n")


def has_digest(path: Path) -> bool:
    return _digest_file(path).is_file()


def damage(path: Path) -> Optional[str]:
    """Why a checkpoint cannot be trusted, or None if its digest matches."""
    sidecar = _digest_file(path)
    if not sidecar.is_file():
        return "no digest (its write did not complete)"
    if sidecar.read_text().strip() != file_sha256(path):
        return "digest mismatch (damaged or modified)"
    return None


def existing(run_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first (temporary files of an interrupted write are ignored)."""
    folder = directory(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def candidates(run_dir: Path, resume: str) -> list[Path]:
    """`--resume`: 'none' starts fresh; 'auto' tries the checkpoints newest first; else that one file."""
    if resume == "none":
        return []
    if resume == "auto":
        return existing(run_dir)[::-1]
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume: {path}: checkpoint not found")
    return [path]


def _rank_state_file(checkpoint: Path, rank: int) -> Path:
    step = _NAME.match(checkpoint.name).group(1)
    return checkpoint.with_name(f"ckpt-{step}.rank-{rank:05d}.npz")


def write_rank_state(checkpoint: Path, rank: int, state: dict[str, np.ndarray]) -> None:
    """This rank's own state for `checkpoint` (written before it), atomically."""
    with atomic_open(_rank_state_file(checkpoint, rank), "wb") as handle:
        np.savez(handle, **state)


def read_rank_state(checkpoint: Path, rank: int) -> Optional[dict[str, np.ndarray]]:
    """This rank's state saved with `checkpoint`, or None when there is none (or it cannot be read)."""
    path = _rank_state_file(checkpoint, rank)
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}
    except (OSError, ValueError):
        return None


def prune(run_dir: Path, keep: int) -> None:
    for old in existing(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        _digest_file(old).unlink(missing_ok=True)
        for rank_state in old.parent.glob(_rank_state_file(old, 0).name.replace("00000", "*")):
            rank_state.unlink(missing_ok=True)
