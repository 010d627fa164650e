"""Checkpoint files in a run directory: naming, integrity, finding the latest good one, keeping the last K.

Each checkpoint is written atomically and followed by a `.sha256` file. A checkpoint whose digest is
missing or wrong (a crash between the two writes, a damaged disk) is skipped on resume in favour of the
previous one, with a warning.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

from hvdtrain.errors import ConfigError
from hvdtrain.atomic import file_sha256, write_text

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


def prune(run_dir: Path, keep: int) -> None:
    for old in existing(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        _digest_file(old).unlink(missing_ok=True)
