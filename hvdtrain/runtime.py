"""Process-level settings that must be in place before Horovod or a framework starts."""
import os

from hvdtrain.config import Config, HorovodConfig
from hvdtrain.errors import ConfigError
from hvdtrain.exchange import STATEFUL_METHODS


def horovod_env(cfg: HorovodConfig, elastic: bool = False) -> dict[str, str]:
    """hvdtrain's tuned Horovod settings as environment variables.

    Elastic jobs (Gloo) keep Horovod's own cycle time and fusion threshold: with a 5 ms cycle and a 64 MiB
    fusion threshold both set, Horovod 0.28.1 crashed (SIGSEGV in hvd.init) re-initialising after a worker
    was removed, in 5 of 5 tries; with either one alone, or neither, it did not (1 try each)."""
    stall = {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(cfg.stall_warning_seconds),
             "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(cfg.stall_shutdown_seconds)}
    if elastic:
        return stall
    # Open MPI reads its MCA variables in MPI_Init, which Horovod calls in hvd.init(): set before that.
    yield_mpi = {"OMPI_MCA_mpi_yield_when_idle": "1"} if cfg.mpi_yield_when_idle else {}
    return {"HOROVOD_CYCLE_TIME": f"{cfg.cycle_time_ms:g}",
            "HOROVOD_FUSION_THRESHOLD": str(int(cfg.fusion_threshold_mb * 1024 * 1024)), **yield_mpi, **stall}


def elastic_launch() -> bool:
    """horovodrun's elastic mode (--min-np/--max-np with a host discovery script) launched this rank."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def configure_horovod_env(cfg: HorovodConfig, elastic: bool = False) -> None:
    """Apply them before hvd.init(); a variable the user (or the launcher) exported wins."""
    for name, value in horovod_env(cfg, elastic).items():
        os.environ.setdefault(name, value)


def framework_trainer(framework: str):
    """The `train(cfg, dataset, run_dir, resume)` of the configured framework's adapter."""
    if framework == "tensorflow":
        from hvdtrain.tf import require_tf_keras

        require_tf_keras()
        from hvdtrain.tf.trainer import train
    else:
        from hvdtrain.torch.trainer import train
    return train


def exchange_mode(cfg: Config, has_gpu: bool, over_gloo: bool = False) -> str:
    """How gradients are averaged (see hvdtrain.torch.exchange): `auto` overlaps where communication can
    run beside backward, on GPUs and over Gloo, whose waits block in the kernel; over Open MPI on CPU
    nodes it uses one flat allreduce, because Open MPI's TCP transport is progressed by polling from
    Horovod's thread, which takes the cores backward needs (benchmarks/README, Scaling). Elastic jobs
    (Gloo) keep the flat exchange, the one their resizing is tested with. Sparse compression (top-k,
    auto) needs the flat exchange, and so does bf16, whose words are allgathered (Horovod 0.28
    allreduces no bfloat16 tensors). Both framework adapters decide it here."""
    if cfg.compression.method in (*STATEFUL_METHODS, "bf16"):  # Horovod 0.28 allreduces no bfloat16
        return "flat"
    if cfg.horovod.gradient_exchange != "auto":
        return cfg.horovod.gradient_exchange
    return "overlap" if has_gpu or (over_gloo and not elastic_launch()) else "flat"


def limit_numpy_threads(threads: int) -> None:
    """NumPy's BLAS (PowerSGD's matrix products, in hvdtrain.exchange) to this rank's share of the cores.
    OpenBLAS starts one spinning thread per core it can see, so without this two ranks on a 2-core node
    run four BLAS threads beside the frameworks' own and Horovod's."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def numpy_threads() -> int:
    """The most threads NumPy's BLAS will use now (for the run's summary)."""
    from threadpoolctl import threadpool_info

    return max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=1)


def device_for_rank(requested: str, gpus: int, local_rank: int, local_size: int) -> str:
    """`cpu` or `cuda:N`: one GPU per local rank. `gpus` is how many this process sees; where the launcher
    gave each rank its own (Slurm's --gpus-per-task, CUDA_VISIBLE_DEVICES per rank) that is one, GPU 0."""
    if requested == "cpu":
        return "cpu"
    if gpus == 0:
        if requested == "cuda":
            raise ConfigError(f"device: cuda, but rank {local_rank} on this node sees no CUDA device "
                              "(no GPU, no CUDA build of the framework, or CUDA_VISIBLE_DEVICES empty); "
                              "use device: auto or cpu")
        return "cpu"
    if gpus == 1:
        return "cuda:0"
    if local_rank >= gpus:
        raise ConfigError(f"device: local rank {local_rank} of {local_size} has no GPU of its own ({gpus} visible "
                          f"on this node): launch at most {gpus} ranks per node")
    return f"cuda:{local_rank}"
