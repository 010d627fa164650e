"""Shared helpers: run the real `hvdtrain` console script, alone or under horovodrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    run_env = dict(os.environ)
    run_env["PATH"] = f"{BIN}:{run_env.get('PATH', '')}"
    run_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    run_env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return run_env


def run(args: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def hvdtrain(*args: str, np: int = 1, controller: str = "gloo", timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """`hvdtrain ARGS`, or `horovodrun -np N --gloo|--mpi hvdtrain ARGS` for N > 1."""
    command = [str(BIN / "hvdtrain"), *args]
    if np > 1:
        command = [str(BIN / "horovodrun"), "-np", str(np), f"--{controller}", *command]
    return run(command, timeout=timeout, check=check)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def rank_processes(marker: str) -> list:
    """The hvdtrain rank processes (not launchers or shells) whose command line mentions `marker`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) > 2 and cmd[0].endswith("python") and cmd[1].endswith("bin/hvdtrain") \
                and any(marker in part for part in cmd):
            found.append(proc)
    return found


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
