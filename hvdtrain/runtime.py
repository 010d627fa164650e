"""Process-level settings that must be in place before Horovod or a framework starts."""
import os

from hvdtrain.config import HorovodConfig


def configure_horovod_env(cfg: HorovodConfig) -> None:
    """hvdtrain's tuned Horovod defaults; a variable the user exported wins."""
    os.environ.setdefault("HOROVOD_CYCLE_TIME", f"{cfg.cycle_time_ms:g}")
    os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(int(cfg.fusion_threshold_mb * 1024 * 1024)))


def threads_per_rank(local_size: int) -> int:
    """Cores this rank may use: Slurm's --cpus-per-task, else its CPU binding if the launcher set one,
    else an equal share of the node."""
    allowed = len(os.sched_getaffinity(0))
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, min(allowed, int(os.environ["SLURM_CPUS_PER_TASK"])))
    total = os.cpu_count() or allowed
    if allowed < total:  # bound by mpirun/srun: the binding is already this rank's share
        return allowed
    return max(1, total // max(1, local_size))
