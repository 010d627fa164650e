"""Users' code named in a config: "package.module:function" or "path/to/file.py:function".

Models (model.factory), losses (train.loss) and metrics (metrics) all name their code this way. A file
path is made absolute when the config is read, so the saved config.yaml still finds the file when
`hvdtrain quantize` or a resume runs it from another directory.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from hvdtrain.errors import ConfigError


def is_entry_point(spec: str) -> bool:
    module, _, function = spec.rpartition(":")
    return bool(module) and bool(function) and function.isidentifier()


def _is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def absolute(spec: str) -> str:
    """The spec with a file path made absolute (relative paths are relative to the working directory)."""
    if not is_entry_point(spec):
        raise ValueError(f"{spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    module, _, function = spec.rpartition(":")
    if _is_file(module):
        return f"{Path(module).expanduser().resolve()}:{function}"
    return spec


def _load_file(path: Path, key: str):
    if not path.is_file():
        raise ConfigError(f"{key}: {path}: file not found")
    # one module per file, named after its path, so two users' files called model.py do not collide
    name = "hvdtrain_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"{key}: importing {path} raised {type(exc).__name__}: {exc}") from None
    return module


def resolve(spec: str, key: str) -> Callable:
    """The function `spec` names; `key` (the config key) is named in the one-line error."""
    if not is_entry_point(spec):
        raise ConfigError(f"{key}: {spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    module_name, _, function = spec.rpartition(":")
    if _is_file(module_name):
        module = _load_file(Path(module_name), key)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"{key}: cannot import {module_name} ({exc})") from None
        except Exception as exc:
            raise ConfigError(f"{key}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    found = getattr(module, function, None)
    if found is None:
        raise ConfigError(f"{key}: {module_name} has no function {function!r}")
    if not callable(found):
        raise ConfigError(f"{key}: {spec} is not callable")
    return found
