"""Typed training configuration: YAML file + `key=value` overrides, validated by pydantic.

Every validation failure becomes one ConfigError line naming the file and the dotted key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hvdtrain.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


TASKS = ("classification", "regression", "segmentation")


class ModelConfig(_Section):
    # The built-in zoo (hvdtrain.torch.models / hvdtrain.tf.models, one factory per name); `factory`
    # replaces it with the user's own.
    name: Literal["mlp", "cnn", "resnet", "unet", "cnn3d"] = "cnn"
    width: int = Field(32, gt=0, description="channels (cnn/resnet/unet/cnn3d) or hidden units (mlp)")
    depth: int = Field(2, gt=0, description="hidden layers (mlp), residual blocks (resnet) or "
                                            "resolution levels (unet, cnn3d)")
    factory: Optional[str] = Field(None, description="the user's model: 'package.module:function' or "
                                   "'path/to/file.py:function', called with sample_shape, num_classes or "
                                   "target_shape, and model.kwargs")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for model.factory")

    @field_validator("factory")
    @classmethod
    def _entry_point(cls, value: Optional[str]) -> Optional[str]:
        from hvdtrain.entrypoints import absolute

        return None if value is None else absolute(value)


class NormalizeConfig(_Section):
    # Applied per batch after the samples are float32 and channels-first, per channel (axis 1).
    method: Literal["none", "divide", "meanstd", "minmax"] = "none"
    divisor: float = Field(255.0, gt=0, description="divide: x / divisor (255 for uint8 images)")
    mean: Optional[list[float]] = Field(None, description="meanstd: per-channel means (or from stats_file)")
    std: Optional[list[float]] = Field(None, description="meanstd: per-channel standard deviations")
    min: Optional[list[float]] = Field(None, description="minmax: per-channel minima (or from stats_file)")
    max: Optional[list[float]] = Field(None, description="minmax: per-channel maxima")
    stats_file: Optional[str] = Field(None, description="an HDF5 file holding the per-channel statistics")
    stats_keys: Optional[list[str]] = Field(None, description="its two datasets: default [mean, std] for "
                                            "meanstd, [min, max] for minmax")

    @model_validator(mode="after")
    def _statistics_given(self) -> "NormalizeConfig":
        pairs = {"meanstd": ("mean", "std"), "minmax": ("min", "max")}
        if self.method in pairs:
            first, second = pairs[self.method]
            given = getattr(self, first) is not None and getattr(self, second) is not None
            if not given and self.stats_file is None:
                raise ValueError(f"method: {self.method} needs data.normalize.{first} and .{second}, or "
                                 "data.normalize.stats_file")
        if self.stats_keys is not None and len(self.stats_keys) != 2:
            raise ValueError(f"stats_keys: two dataset names, got {self.stats_keys}")
        return self


class DataConfig(_Section):
    # digits: scikit-learn's 8x8 digits, in memory; synthetic: random images for benchmarks;
    # npz:PATH: a user's arrays `x` (N, ...) and `y` (N,); npy:DIR: a directory of x.npy/y.npy or
    # NAME_x.npy/NAME_y.npy pairs; hdf5: shard sets or users' HDF5 files
    source: str = "digits"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    synthetic_samples: int = Field(2048, gt=0)
    synthetic_shape: list[int] = Field(default_factory=lambda: [1, 8, 8])
    synthetic_classes: int = Field(10, gt=1)
    # hdf5 only: each of train/test is a shard-set directory, a directory of .h5 files, a glob or a list
    train: Optional[Union[str, list[str]]] = None
    test: Optional[Union[str, list[str]]] = None
    x_key: str = "x"
    y_key: str = "y"
    one_sample_per_file: bool = Field(False, description="hdf5: every file is one sample (no sample axis)")
    layout: Literal["nchw", "nhwc"] = Field("nchw", description="where the channel axis of the stored "
                                            "samples is: first (nchw, ncdhw) or last (nhwc, ndhwc)")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    num_classes: Optional[int] = Field(None, gt=1, description="classes of classification/segmentation "
                                       "labels; default: the largest label + 1, read from the files")
    tail: Literal["drop", "pad"] = Field("drop", description="the last partial global batch: "
                                         "drop it, or pad it by wrapping to the epoch's start")
    shuffle_buffer_mb: float = Field(64, gt=0, description="samples are shuffled within windows this big")
    workers: int = Field(0, ge=0, description="DataLoader worker processes reading shards (0: in-process)")
    read_threads: int = Field(0, ge=0, description="threads copying each window in-process (0: the rank's "
                              "cores, at most 4); workers read with one each")
    prefetch: int = Field(2, ge=1, description="windows each worker reads ahead")
    verify: bool = Field(False, description="check shard checksums before training")
    audit: bool = Field(False, description="elastic training: log the sample ids each rank trained on to "
                                           "RUN_DIR/sample-audit/ (coverage across resizes)")

    @model_validator(mode="after")
    def _known_source(self) -> "DataConfig":
        if self.source not in ("digits", "synthetic", "hdf5") and not self.source.startswith(("npz:", "npy:")):
            raise ValueError(f"source: unknown data source {self.source!r} (digits, synthetic, npz:PATH, "
                             "npy:DIR, hdf5)")
        if self.source == "hdf5" and (not self.train or not self.test):
            raise ValueError("train: data.source hdf5 needs data.train and data.test (shard sets or HDF5 files)")
        return self


class TrainConfig(_Section):
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(32, gt=0, description="samples per rank per step")
    max_steps: Optional[int] = Field(None, gt=0, description="stop early after this many steps; "
                                     "does not change the learning-rate schedule")
    # lars / lamb: layer-wise trust ratios for large global batches (hvdtrain.torch.optim, hvdtrain.tf.optim)
    optimizer: Literal["sgd", "adam", "lars", "lamb"] = "sgd"
    lr: float = Field(0.05, gt=0, description="learning rate for one rank; scaled with the number of ranks")
    # bf16: autocast to bfloat16 (CPUs with AVX-512 BF16/AMX, and GPUs from Ampere); fp16: float16 autocast
    # with dynamic loss scaling (GPUs); the weights, the optimizer and the gradient exchange stay float32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss: Optional[str] = Field(None, description="cross_entropy, mse, mae, or an entry point "
                                "'module:function' / 'file.py:function' in the framework's own argument order "
                                "(torch: outputs, targets; Keras: y_true, y_pred); default: the task's")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and lars")
    weight_decay: float = Field(0.0, ge=0)
    # linear: lr x ranks (Goyal et al., for SGD); sqrt: lr x sqrt(ranks) (the usual rule for Adam); none
    scale_lr: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = Field(3.0, ge=0, description="ramp from lr to the scaled lr over this many epochs "
                                 "(a fixed span of data, so the ramp lengthens in steps as ranks grow)")
    warmup_steps: Optional[int] = Field(None, ge=0, description="the ramp in steps instead; overrides warmup_epochs")
    schedule: Literal["cosine", "constant"] = "cosine"
    log_every: int = Field(10, gt=0, description="steps between train-loss averages (and divergence checks)")
    on_divergence: Literal["stop", "rollback"] = Field("stop", description="a non-finite loss, gradient norm "
                                                       "or weight: stop (exit 3) or roll back to the last good "
                                                       "checkpoint with a lower learning rate")
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1, description="rollback: the learning rate is multiplied by this")
    max_rollbacks: int = Field(3, ge=1, description="rollback: give up (exit 3) after this many")

    @field_validator("loss")
    @classmethod
    def _loss_name(cls, value: Optional[str]) -> Optional[str]:
        from hvdtrain.entrypoints import absolute, is_entry_point
        from hvdtrain.tasks import LOSSES

        if value is None or value in LOSSES:
            return value
        if not is_entry_point(value):
            raise ValueError(f"unknown loss {value!r} (use {', '.join(LOSSES)} or 'module:function')")
        return absolute(value)

    @field_validator("scale_lr", mode="before")
    @classmethod
    def _boolean_scale_lr(cls, value: Any) -> Any:
        """`true`/`false` from configs written before the rules had names: linear and none."""
        if isinstance(value, bool):
            return "linear" if value else "none"
        return value


class CheckpointConfig(_Section):
    every_steps: int = Field(200, gt=0)
    keep: int = Field(3, gt=0)


class HorovodConfig(_Section):
    # Measured on 2 cores (README, Performance): with Open MPI yielding while idle, Horovod's own 1 ms
    # cycle is fastest; without yielding, every cycle's busy-polling competes with compute.
    cycle_time_ms: float = Field(1.0, gt=0)
    mpi_yield_when_idle: bool = Field(True, description="OMPI_MCA_mpi_yield_when_idle=1: Open MPI waits "
                                      "with sched_yield instead of spinning (Horovod over MPI)")
    fusion_threshold_mb: float = Field(64.0, ge=0)
    # auto: overlap on GPUs and over Gloo; flat over MPI on CPU nodes and in elastic jobs (runtime.exchange_mode)
    gradient_exchange: Literal["auto", "flat", "overlap"] = "auto"
    # Horovod's stall inspector: rank 0 names the ranks missing from a collective after
    # stall_warning_seconds, and shuts the job down after stall_shutdown_seconds (0: never).
    stall_warning_seconds: int = Field(60, gt=0)
    stall_shutdown_seconds: int = Field(600, ge=0)

    @model_validator(mode="after")
    def _shutdown_after_warning(self) -> "HorovodConfig":
        if 0 < self.stall_shutdown_seconds < self.stall_warning_seconds:
            raise ValueError("stall_shutdown_seconds: must be 0 (never) or at least stall_warning_seconds")
        return self


class CompressionConfig(_Section):
    # none | fp16 | bf16 | topk (allgather of values+indices, error feedback) | shared_topk (one index set
    # per step chosen by a rotating leader, allreduce of values) | powersgd (rank-r factors of each matrix,
    # error feedback, warm start) | auto (measured choice of none, topk and powersgd)
    method: Literal["none", "fp16", "bf16", "topk", "shared_topk", "powersgd", "auto"] = "none"
    ratio: float = Field(0.01, gt=0, le=1, description="top-k: share of each tensor's entries sent per step")
    min_size: int = Field(4096, ge=1, description="top-k: tensors smaller than this go through a dense allreduce")
    warmup_steps: int = Field(0, ge=0, description="top-k: steps over which the share sent falls from "
                              "warmup_ratio to ratio (DGC's sparsity warm-up); 0: ratio from the start")
    warmup_ratio: float = Field(0.25, gt=0, le=1, description="top-k: share sent at the first step of the warm-up")
    momentum_correction: bool = Field(False, description="topk/shared_topk: DGC's momentum correction and "
                                      "momentum factor masking; SGD momentum is then applied by the exchange")
    powersgd_rank: int = Field(4, ge=1, description="powersgd: rank of each matrix's factors (PyTorch's "
                               "matrix_approximation_rank)")
    powersgd_start_step: int = Field(10, ge=0, description="powersgd: dense steps before the first factorized "
                                     "one (PyTorch's start_powerSGD_iter)")
    powersgd_warm_start: bool = Field(True, description="powersgd: reuse each Q from the step before (one power "
                                      "iteration per step); false: a fresh random Q every step")
    powersgd_min_rate: float = Field(2.0, ge=1, description="powersgd: factorize a matrix only where its factors "
                                     "are this many times smaller (PyTorch's min_compression_rate)")
    auto_trial_steps: int = Field(10, ge=2, description="auto: steps timed per candidate")
    auto_recheck_every: int = Field(500, ge=10, description="auto: steps between re-measurements")

    @model_validator(mode="after")
    def _room_for_trials(self) -> "CompressionConfig":
        if self.auto_recheck_every < 4 * self.auto_trial_steps:
            raise ValueError("auto_recheck_every: must be at least 4 x auto_trial_steps (dense, top-k, the "
                             "chosen mix and powersgd are each timed that many steps)")
        return self


class Config(_Section):
    framework: Literal["torch", "tensorflow"] = "torch"
    # sets the labels' kind, the default loss and the default metrics (hvdtrain.tasks)
    task: Literal[TASKS] = "classification"
    # auto: one GPU per local rank where CUDA sees GPUs, else the CPU; cuda: fail in one line without one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    metrics: Optional[list[str]] = Field(None, description="metrics on the held-out set, logged as test_NAME: "
                                         "built-in names or entry points; default: the task's")
    seed: int = Field(42, ge=0, lt=2**32, description="seeds the split, the shuffle and the weights (numpy takes 0..2**32-1)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    horovod: HorovodConfig = Field(default_factory=HorovodConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)

    @model_validator(mode="after")
    def _overlap_sends_what_horovod_allreduces(self) -> "Config":
        method = self.compression.method
        if self.horovod.gradient_exchange == "overlap" and method in ("topk", "shared_topk", "powersgd", "auto", "bf16"):
            why = ("Horovod 0.28.1 allreduces no bfloat16 tensors" if method == "bf16" else
                   "compressed methods work on the flat gradient buffer")
            raise ValueError(f"horovod.gradient_exchange: overlap cannot run compression.method {method} ({why}); "
                             "use gradient_exchange flat or auto" + (", or fp16" if method == "bf16" else ""))
        return self

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        from hvdtrain.entrypoints import absolute, is_entry_point
        from hvdtrain.metrics import BUILTIN

        if value is None:
            return None
        for name in value:
            if name not in BUILTIN and not is_entry_point(name):
                raise ValueError(f"unknown metric {name!r} (use {', '.join(BUILTIN)} or 'module:function')")
        return [name if name in BUILTIN else absolute(name) for name in value]

    @model_validator(mode="after")
    def _task_fits_model_and_loss(self) -> "Config":
        from hvdtrain import tasks

        tasks.check_config(self)
        return self

    @model_validator(mode="after")
    def _momentum_correction_needs_sgd_momentum(self) -> "Config":
        if self.compression.momentum_correction and (self.compression.method not in ("topk", "shared_topk")
                                                     or self.train.optimizer != "sgd" or not self.train.momentum):
            raise ValueError("compression.momentum_correction: needs compression.method topk or shared_topk and "
                             "train.optimizer sgd with momentum > 0")
        return self


def choices(key: str) -> tuple[str, ...]:
    """The names a Literal-typed key accepts, e.g. choices("compression.method"): one list, the config's."""
    section, field_name = key.split(".")
    return get_args(Config.model_fields[section].annotation.model_fields[field_name].annotation)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and ": " in message:
        # a section's own check names its key first ("source: ..."): report it as section.key
        field_name, message = message.split(": ", 1)
        return f"{key}.{field_name}: {message}" if key else f"{field_name}: {message}"
    if isinstance(error["input"], dict):
        return f"{key}: {message}"
    return f"{key}: {message} (got {error['input']!r})" if key else message


def validate(raw: dict[str, Any], origin: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"{origin}: {_describe(first)}{suffix}") from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, 0.1, true, [1,2] work)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        node[parts[-1]] = text


def load(path: Optional[str], overrides: list[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    origin = "config"
    if path:
        origin = path
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    for override in overrides:
        apply_override(raw, override)
    return validate(raw, origin)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
