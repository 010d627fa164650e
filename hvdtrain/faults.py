"""When a rank fails, rank 0 says which one and why, and no rank waits forever.

A failed rank cannot tell rank 0 through a collective: rank 0 is blocked in one the failed rank never
joins, and the launcher kills the survivors seconds later. So a rank that fails writes its one-line
error to RUN_DIR/failures/rank-N.txt (atomically) and waits a moment before exiting, while rank 0
watches that folder from a thread and prints the line as soon as it appears. On clusters the run
directory is on the shared file system; where it is not, each rank's own line is still in the job log.

`HVDTRAIN_FAULT=KIND@RANK:STEP` injects a fault at the start of a step, to rehearse on a cluster what
a failure looks like: `raise` (an exception on that rank) or `stall` (that rank stops calling
collectives, as a hung file system would make it).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from hvdtrain.errors import ConfigError, UserError
from hvdtrain.atomic import write_text
from hvdtrain.world import world

RELAY_GRACE_S = 2.0   # a failing rank waits this long for rank 0's watcher to print its line
POLL_S = 0.2


def one_line(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def is_collective_failure(exc: BaseException) -> bool:
    """Horovod's error for a collective that cannot complete (a peer died, or Horovod shut down)."""
    from horovod.common.exceptions import HorovodInternalError

    return isinstance(exc, HorovodInternalError) or "Horovod has been shut down" in str(exc)


class FailureRelay:
    """Context for one rank's training run: rank 0 relays other ranks' failures; others report theirs."""

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / "failures"
        self.relayed: list[str] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "FailureRelay":
        if world.rank == 0 and world.size > 1:
            for stale in self.folder.glob("rank-*.txt"):  # from an earlier launch of this run
                stale.unlink(missing_ok=True)
            self._thread = threading.Thread(target=self._watch, name="failure-relay", daemon=True)
            self._thread.start()
        return self

    def _scan(self) -> None:
        for path in sorted(self.folder.glob("rank-*.txt")):
            if path.name not in self._seen:
                self._seen.add(path.name)
                self.relayed.append(path.read_text().strip())
                tqdm.write(f"hvdtrain: rank 0: {self.relayed[-1]}", file=sys.stderr)  # clears the progress bar

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            self._scan()

    def __exit__(self, kind, exc, tb) -> bool:
        self._stop.set()
        if exc is None or world.size == 1 or (isinstance(exc, UserError) and exc.quiet):
            return False  # (a quiet error: every rank saw the same cause, and rank 0 says it)
        if not is_collective_failure(exc):
            if world.rank != 0:
                write_text(self.folder / f"rank-{world.rank}.txt", f"rank {world.rank} failed: {one_line(exc)}\n")
                time.sleep(RELAY_GRACE_S)
            return False
        if self._thread is not None:
            self._thread.join()
            self._scan()
        cause = ("; ".join(self.relayed) if self.relayed else
                 "another rank died, or stalled past horovod.stall_shutdown_seconds (see Horovod's report above)")
        raise UserError(f"the job stopped because a collective could not complete: {cause}",
                        quiet=world.rank != 0) from None


class InjectedFault(RuntimeError):
    pass


def _parse(spec: str) -> tuple[str, int, int]:
    match = re.fullmatch(r"(raise|stall)@(\d+):(\d+)", spec.strip())
    if not match:
        raise ConfigError(f"HVDTRAIN_FAULT: {spec!r} is not KIND@RANK:STEP with KIND raise or stall "
                          "(e.g. raise@1:20)")
    return match.group(1), int(match.group(2)), int(match.group(3))


class FaultInjector:
    """Triggers HVDTRAIN_FAULT on its rank at its step; does nothing when the variable is unset."""

    def __init__(self):
        spec = os.environ.get("HVDTRAIN_FAULT")
        self.fault = _parse(spec) if spec else None

    def at_step(self, step: int) -> None:
        if self.fault is None:
            return
        kind, rank, at = self.fault
        if rank != world.rank or step != at:
            return
        if kind == "raise":
            raise InjectedFault(f"injected fault at step {step} (HVDTRAIN_FAULT)")
        print(f"hvdtrain: rank {rank}: stalling at step {step} (HVDTRAIN_FAULT)", file=sys.stderr, flush=True)
        while True:  # a rank that stops calling collectives; only a signal ends it
            time.sleep(3600)
