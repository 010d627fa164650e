"""hvdtrain.fit: the training job from Python, for users who prefer code to YAML.

    horovodrun -np 2 python my_script.py      # or srun python my_script.py

    import hvdtrain
    summary = hvdtrain.fit(model=my_module, loss=torch.nn.CrossEntropyLoss(), train=(x, y), test=(x_t, y_t),
                           config={"task": "classification", "train": {"epochs": 5}}, run_dir="runs/mine")

Every rank runs the script and calls fit with the same arguments: the same loop, checkpoints, compression
and metrics as `hvdtrain train`. `model` is a torch.nn.Module or a Keras model (its type sets the framework).
`train`/`test` are (x, y) NumPy arrays or HDF5 shard sets / files (a path, a glob or a list of paths).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from hvdtrain import config as config_module
from hvdtrain import runtime
from hvdtrain.data import Arrays, Dataset
from hvdtrain.errors import ConfigError
from hvdtrain.sources import checked

Data = Union[tuple, str, Sequence[str]]


def framework_of(model: Any) -> str:
    """torch or tensorflow, from the model's type."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    for cls in type(model).__mro__:
        if cls.__module__.split(".")[0] in ("tf_keras", "keras", "tensorflow"):
            return "tensorflow"
    raise ConfigError(f"model: a {type(model).__name__} is neither a torch.nn.Module nor a Keras model")


def _config(config: Any, overrides: Sequence[str], framework: str) -> config_module.Config:
    if isinstance(config, config_module.Config):
        raw, origin = config.model_dump(mode="json"), "config"
    elif isinstance(config, (str, Path)):
        return config_module.load(str(config), [*overrides, f"framework={framework}"])
    else:
        raw, origin = dict(config or {}), "config"
    raw["framework"] = framework
    for override in overrides:
        config_module.apply_override(raw, override)
    return config_module.validate(raw, origin)


def _arrays(train: tuple, test: tuple, task: str) -> Arrays:
    if len(train) != 2 or len(test) != 2:
        raise ConfigError("train/test: give (x, y) array pairs, or HDF5 paths")
    x_train, y_train = checked(np.asarray(train[0]), np.asarray(train[1]), "train", task)
    x_test, y_test = checked(np.asarray(test[0]), np.asarray(test[1]), "test", task)
    if x_train.shape[1:] != x_test.shape[1:] or y_train.shape[1:] != y_test.shape[1:]:
        raise ConfigError(f"test: samples {x_test.shape[1:]} / labels {y_test.shape[1:]} disagree with train "
                          f"({x_train.shape[1:]} / {y_train.shape[1:]})")
    classes = int(max(y_train.max(), y_test.max())) + 1 if np.issubdtype(y_train.dtype, np.integer) else 0
    return Arrays(x_train, y_train, x_test, y_test, classes)


def fit(model: Any, train: Data, test: Data, loss: Optional[Any] = None, config: Any = None,
        run_dir: Union[str, Path] = "runs/fit", resume: str = "auto", overrides: Sequence[str] = ()) -> dict:
    """Train `model` data-parallel under Horovod; returns the run's summary (also RUN_DIR/summary.json).

    loss: a callable in the framework's own order (torch: loss(outputs, targets); Keras: loss(y_true,
    y_pred)), or None for the config's train.loss / the task's default. config: a dict of sections, a YAML
    path or a Config; overrides: dotted `key=value` strings on top of it. Errors in the input raise
    hvdtrain.errors.ConfigError with the one line the CLI would print."""
    framework = framework_of(model)
    cfg = _config(config, overrides, framework)
    if isinstance(train, tuple):
        dataset = Dataset(cfg.data, cfg.seed, cfg.task, arrays=_arrays(train, test, cfg.task))
    else:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "hdf5", "train": train,
                                                                           "test": test})})
        dataset = Dataset(cfg.data, cfg.seed, cfg.task)
    train_fn = runtime.framework_trainer(framework)
    return train_fn(cfg, dataset, Path(run_dir), resume, model=model, loss=loss)
