"""TensorBoard event files from rank 0, beside metrics.jsonl: every number of each evaluation record.

Written with TensorBoard's own event writer (the `tensorboard` package, which PyTorch's SummaryWriter
uses underneath), so a TensorFlow run does not import PyTorch nor the other way round.
"""
from __future__ import annotations

import math
import sys
import time
import types
from pathlib import Path

SKIPPED = ("step", "epoch", "world_size")


class TensorBoard:
    def __init__(self, directory: Path):
        # TensorBoard's file layer imports TensorFlow when it can (5 s and its start-up lines in a PyTorch
        # job) unless `tensorboard.compat.notf` exists: then it uses its own stub, which writes local files.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(directory))

    def write(self, step: int, record: dict) -> None:
        """One scalar per numeric entry (losses, test metrics, lr, samples_per_s, bytes_per_step, ...)."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=name, simple_value=float(value)) for name, value in record.items()
                  if name not in SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value)]
        self.writer.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
