"""Who this process is in the job: rank, size, local rank and local size, answered in one place.

Before Horovod starts, the launcher's variables say it (horovodrun, mpirun, torchrun, srun). Once a
framework adapter has called `hvd.init()` and `world.attach(hvd)`, every read goes to Horovod itself,
live: an elastic job changes size while it runs, so nothing may keep a copy of these numbers.
"""
from __future__ import annotations

import os
from typing import Any, Optional

# (rank, size, local rank, local size) per launcher, most specific first: mpirun and torchrun started
# inside a Slurm allocation inherit SLURM_PROCID from the batch shell, so Slurm's come last.
LAUNCHER_VARS = (
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


def _int(value: Optional[str], default: int) -> int:
    # SLURM_NTASKS_PER_NODE may read "2(x3)": the count before the repeat
    text = (value or "").split("(")[0].split(",")[0]
    return int(text) if text.isdigit() else default


def launcher_identity(environ: Optional[dict] = None) -> Optional[tuple[int, int, int, int]]:
    """(rank, size, local rank, local size) from the first launcher whose variables are set, else None."""
    env = os.environ if environ is None else environ
    for rank_var, size_var, local_rank_var, local_size_var in LAUNCHER_VARS:
        if env.get(rank_var, "").isdigit() and env.get(size_var, "").isdigit():
            size = int(env[size_var])
            return (int(env[rank_var]), size, _int(env.get(local_rank_var), 0),
                    _int(env.get(local_size_var), size))
    return None


class World:
    """The job as this process sees it. Read its properties each time; never store them."""

    def __init__(self) -> None:
        self._hvd: Any = None

    def attach(self, hvd: Any) -> None:
        """Called by a framework adapter right after `hvd.init()`: from now on, Horovod answers."""
        self._hvd = hvd

    def detach(self) -> None:
        self._hvd = None

    @property
    def horovod(self) -> Any:
        """The initialised Horovod binding (horovod.torch or horovod.tensorflow), or None before."""
        return self._hvd

    def _ask(self, index: int, horovod_call: str) -> int:
        """Field `index` of (rank, size, local rank, local size): from Horovod once it is up, else the launcher."""
        if self._hvd is not None:
            try:
                return getattr(self._hvd, horovod_call)()
            except ValueError:  # Horovod shut down (a failed job on its way out): the launcher still knows
                pass
        return (launcher_identity() or (0, 1, 0, 1))[index]

    @property
    def rank(self) -> int:
        return self._ask(0, "rank")

    @property
    def size(self) -> int:
        return self._ask(1, "size")

    @property
    def local_rank(self) -> int:
        return self._ask(2, "local_rank")

    @property
    def local_size(self) -> int:
        return self._ask(3, "local_size")

    @property
    def cores(self) -> int:
        """Cores this rank may use: Slurm's --cpus-per-task, else its CPU binding if the launcher set one,
        else an equal share of the node."""
        allowed = len(os.sched_getaffinity(0))
        if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
            return max(1, min(allowed, int(os.environ["SLURM_CPUS_PER_TASK"])))
        total = os.cpu_count() or allowed
        if allowed < total:  # bound by mpirun/srun: the binding is already this rank's share
            return allowed
        return max(1, total // max(1, self.local_size))

    @property
    def collectives(self) -> str:
        """What Horovod's CPU collectives run over once it is up: "gloo" (horovodrun --gloo, elastic jobs)
        or "mpi"."""
        return "gloo" if self._hvd is not None and self._hvd.gloo_enabled() else "mpi"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Started by a launcher (even with one rank), so a failure can be relayed and a rank named."""
        return self._hvd is not None or launcher_identity() is not None

    def __repr__(self) -> str:
        source = "horovod" if self._hvd is not None else "launcher" if launcher_identity() else "single process"
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, " \
               f"local_size={self.local_size}, from {source})"


world = World()
