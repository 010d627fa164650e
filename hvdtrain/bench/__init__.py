"""Benchmarks behind `hvdtrain bench ...`: each prints its figures and writes them as JSON."""

import os
import sys


class Targets:
    """The thresholds a benchmark holds its figures to: each is checked, printed as met or MISSED, and
    recorded in the benchmark's JSON (`targets`), so a figure and its bar never drift apart."""

    def __init__(self) -> None:
        self.checked: list[dict] = []

    def check(self, what: str, value: float, op: str, threshold: float) -> str:
        """`value` against `threshold` (op ">=" or "<="); returns the text to print after the figure."""
        met = value >= threshold if op == ">=" else value <= threshold
        self.checked.append({"target": what, "value": value, "op": op, "threshold": threshold, "met": bool(met)})
        return f"(target {op} {threshold:g}: {'met' if met else 'MISSED'})"


def end_torch_distributed() -> None:
    """Leave a torch.distributed (gloo) worker: destroy the group, then exit without the interpreter's
    teardown. With torch 2.13 that teardown aborted a gloo rank ("terminate called without an active
    exception") in 2 to 7 of 20 two-rank runs here, barrier or not; with os._exit, 0 of 60."""
    import torch.distributed

    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
