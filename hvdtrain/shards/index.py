"""A shard set: the HDF5 files of one split and what is known about them (index.json).

hvdtrain writes index.json beside its shards. For users' own HDF5 files (a directory, a glob or a list)
the same index is built by opening each file once, whatever chunking, compression or layout it has.
"""
from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np

from hvdtrain.errors import ConfigError
from hvdtrain.atomic import file_sha256

INDEX_NAME = "index.json"
FORMAT = "hvdtrain-shards/1"
READ_BLOCK_BYTES = 4 << 20  # read unit: whole chunks adding up to about 4 MiB


@dataclass
class Shard:
    path: str                  # relative to the set's root for hvdtrain sets, absolute for users' files
    count: int
    sha256: Optional[str] = None
    chunk_samples: Optional[int] = None  # chunk length along the sample axis; None = contiguous


@dataclass
class ShardSet:
    root: Path
    shards: list[Shard]
    sample_shape: tuple[int, ...]
    x_dtype: str
    y_dtype: str
    num_classes: int
    split: str = "train"
    x_key: str = "x"
    y_key: str = "y"
    extra: dict = field(default_factory=dict)
    label_shape: tuple[int, ...] = ()  # per sample: () for a class id, (H, W) for a mask, (4,) for targets
    one_sample: bool = False           # every file is one sample: its datasets have no sample axis

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(s.count for s in self.shards)

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(self.x_dtype).itemsize

    def shard_path(self, i: int) -> Path:
        return self.root / self.shards[i].path

    def block_samples(self) -> tuple[int, ...]:
        """Per shard, the read-block length: a whole number of chunks, about READ_BLOCK_BYTES."""
        per_block = max(1, READ_BLOCK_BYTES // max(1, self.sample_bytes))
        blocks = []
        for shard in self.shards:
            chunk = shard.chunk_samples or 1
            blocks.append(max(chunk, per_block // chunk * chunk))
        return tuple(blocks)

    def to_json(self) -> dict:
        return {"format": FORMAT, "split": self.split, "x_key": self.x_key, "y_key": self.y_key,
                "sample_shape": list(self.sample_shape), "x_dtype": self.x_dtype, "y_dtype": self.y_dtype,
                "num_classes": self.num_classes, "total": self.total, "label_shape": list(self.label_shape),
                "shards": [asdict(s) for s in self.shards], **self.extra}


def _confined(index: Path, shard_path: str) -> str:
    """An index names its shards relative to its own directory; it may not point anywhere else."""
    root = index.parent.resolve()
    if Path(shard_path).is_absolute() or not (root / shard_path).resolve().is_relative_to(root):
        raise ConfigError(f"{index}: shard path {shard_path!r} leaves the shard set's directory")
    return shard_path


def _read_index(directory: Path) -> ShardSet:
    path = directory / INDEX_NAME
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ConfigError(f"{path}: not an hvdtrain shard index (format {raw.get('format')!r})")
        for shard in raw["shards"]:
            shard["path"] = _confined(path, shard["path"])
        return ShardSet(root=directory, shards=[Shard(**s) for s in raw["shards"]],
                        sample_shape=tuple(raw["sample_shape"]), x_dtype=raw["x_dtype"],
                        y_dtype=raw["y_dtype"], num_classes=int(raw["num_classes"]), split=raw["split"],
                        x_key=raw["x_key"], y_key=raw["y_key"],
                        extra={"compression": raw.get("compression", "none")},
                        label_shape=tuple(raw.get("label_shape", ())))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable shard index ({type(exc).__name__}: {exc})") from None


def _dataset(handle: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in handle or not isinstance(handle[key], h5py.Dataset):
        raise ConfigError(f"{path}: no dataset {key!r} (data.x_key / data.y_key name the datasets)")
    return handle[key]


def open_h5(path: Path, **kwargs) -> h5py.File:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return h5py.File(path, "r", **kwargs)
    except OSError as exc:
        raise ConfigError(f"{path}: not a readable HDF5 file ({exc})") from None


def _scan(files: Sequence[Path], x_key: str, y_key: str, split: str, one_sample: bool = False,
          count_classes: bool = True) -> ShardSet:
    """Index users' files: counts, schema (must agree), chunking, and (count_classes) the label range.

    one_sample: each file's datasets are one sample and its label, without a sample axis."""
    shards, schema, max_label = [], None, -1
    for path in files:
        with open_h5(path) as handle:
            x, y = _dataset(handle, x_key, path), _dataset(handle, y_key, path)
            if one_sample:
                count, sample_shape, label_shape = 1, tuple(x.shape), tuple(y.shape)
            else:
                if x.ndim == 0 or y.ndim == 0:
                    raise ConfigError(f"{path}: {x_key} {x.shape} / {y_key} {y.shape} have no sample axis; "
                                      "set data.one_sample_per_file=true if each file holds one sample")
                if x.shape[0] != y.shape[0]:
                    raise ConfigError(f"{path}: {x_key} has {x.shape[0]} samples but {y_key} has {y.shape[0]}"
                                      " along the first axis; if each file holds one sample, set "
                                      "data.one_sample_per_file=true")
                count, sample_shape, label_shape = int(x.shape[0]), tuple(x.shape[1:]), tuple(y.shape[1:])
            if count == 0:
                raise ConfigError(f"{path}: empty shard (0 samples)")
            file_schema = (sample_shape, x.dtype.str, label_shape, y.dtype.str)
            if schema is None:
                schema = file_schema
            elif file_schema != schema:
                raise ConfigError(f"{path}: samples {file_schema[0]} {np.dtype(file_schema[1])} / labels "
                                  f"{file_schema[2]} {np.dtype(file_schema[3])} disagree with {files[0]} "
                                  f"({schema[0]} {np.dtype(schema[1])} / {schema[2]} {np.dtype(schema[3])})")
            if count_classes:
                labels = y[()]
                if not np.issubdtype(labels.dtype, np.integer):
                    raise ConfigError(f"{path}: labels {y_key} must be integers (class ids), found {labels.dtype}; "
                                      "use task: regression for float targets")
                if labels.min() < 0:
                    raise ConfigError(f"{path}: negative label {labels.min()} in {y_key}")
                max_label = max(max_label, int(labels.max()))
            chunk = x.chunks[0] if x.chunks and not one_sample else None
            shards.append(Shard(path=str(path.resolve()), count=count, chunk_samples=chunk))
    shape, x_dtype, label_shape, y_dtype = schema
    return ShardSet(root=Path("/"), shards=shards, sample_shape=shape, x_dtype=np.dtype(x_dtype).name,
                    y_dtype=np.dtype(y_dtype).name, num_classes=max_label + 1, split=split,
                    x_key=x_key, y_key=y_key, label_shape=label_shape, one_sample=one_sample)


def open_set(spec: Union[str, Sequence[str]], x_key: str = "x", y_key: str = "y", split: str = "train",
             origin: str = "data", one_sample: bool = False, count_classes: bool = True) -> ShardSet:
    """A shard set from an hvdtrain directory (with index.json), a directory of .h5 files, a glob or a list."""
    if isinstance(spec, str):
        directory = Path(spec)
        if directory.is_dir():
            if (directory / INDEX_NAME).is_file():
                return _read_index(directory)
            files = sorted(p for p in directory.iterdir() if p.suffix in (".h5", ".hdf5"))
        elif any(c in spec for c in "*?["):
            files = [Path(p) for p in sorted(glob.glob(spec))]
        elif not directory.exists():
            raise ConfigError(f"{origin}: {spec}: no such file or directory")
        else:
            files = [directory]
    else:
        files = [Path(p) for p in spec]
    if not files:
        raise ConfigError(f"{origin}: {spec}: no HDF5 files found")
    return _scan(files, x_key, y_key, split, one_sample, count_classes)


def verify(shard_set: ShardSet) -> list[str]:
    """Check every shard against the index: checksum, readable datasets, schema, count, label range.

    Returns one line per shard checked; raises ConfigError at the first problem, naming the file.
    """
    lines = []
    for i, shard in enumerate(shard_set.shards):
        path = shard_set.shard_path(i)
        if not path.is_file():
            raise ConfigError(f"{path}: file not found (listed in the index)")
        if shard.sha256 and file_sha256(path) != shard.sha256:
            raise ConfigError(f"{path}: checksum mismatch: the shard is corrupt or was modified")
        with open_h5(path) as handle:
            x, y = _dataset(handle, shard_set.x_key, path), _dataset(handle, shard_set.y_key, path)
            stored = tuple(x.shape) if shard_set.one_sample else tuple(x.shape[1:])
            if stored != tuple(shard_set.sample_shape) or x.dtype != np.dtype(shard_set.x_dtype):
                raise ConfigError(f"{path}: samples {stored} {x.dtype} disagree with the index "
                                  f"({tuple(shard_set.sample_shape)} {shard_set.x_dtype})")
            if not shard_set.one_sample and (x.shape[0] != shard.count or y.shape[0] != shard.count):
                raise ConfigError(f"{path}: {x.shape[0]} samples / {y.shape[0]} labels, index says {shard.count}")
            try:
                labels = y[()]
            except OSError as exc:
                raise ConfigError(f"{path}: unreadable labels ({exc})") from None
            if shard_set.num_classes and labels.size and (labels.min() < 0 or labels.max() >= shard_set.num_classes):
                raise ConfigError(f"{path}: labels outside [0, {shard_set.num_classes})")
        lines.append(f"ok {path} ({shard.count} samples)")
    return lines


def sets_under(spec: str, x_key: str = "x", y_key: str = "y", one_sample: bool = False,
               count_classes: bool = True) -> list[ShardSet]:
    """The shard sets a user points at: a set, a `data shard` output (train/ and test/), or HDF5 files."""
    directory = Path(spec)
    if directory.is_dir() and not (directory / INDEX_NAME).is_file():
        splits = sorted(p for p in directory.iterdir() if (p / INDEX_NAME).is_file())
        if splits:
            return [_read_index(p) for p in splits]
    if not directory.exists() and not any(c in spec for c in "*?["):
        raise ConfigError(f"{spec}: no such file or directory")
    return [open_set(spec, x_key, y_key, split=directory.name or "data", origin=spec, one_sample=one_sample,
                     count_classes=count_classes)]


def describe(shard_set: ShardSet) -> str:
    """A human summary of one set."""
    paths = [shard_set.shard_path(i) for i in range(len(shard_set.shards))]
    disk = sum(p.stat().st_size for p in paths if p.is_file())
    counts = shard_set.counts
    chunks = sorted({s.chunk_samples for s in shard_set.shards}, key=lambda c: c or 0)
    chunk_text = ", ".join("contiguous" if c is None else f"{c} samples" for c in chunks)
    logical = shard_set.total * shard_set.sample_bytes
    return "\n".join([
        f"{shard_set.split}: {shard_set.total} samples in {len(counts)} shard(s) "
        f"({min(counts)}..{max(counts)} per shard)",
        f"  samples  {shard_set.x_key}: {tuple(shard_set.sample_shape)} {shard_set.x_dtype}, "
        f"labels {shard_set.y_key}: {tuple(shard_set.label_shape)} {shard_set.y_dtype}"
        + (f", {shard_set.num_classes} classes" if shard_set.num_classes else "")
        + (", one sample per file" if shard_set.one_sample else ""),
        f"  chunks   {chunk_text}; compression {shard_set.extra.get('compression', 'as stored')}",
        f"  size     {logical / 2**20:.1f} MiB of samples, {disk / 2**20:.1f} MiB on disk",
        f"  location {paths[0].parent if shard_set.root != Path('/') else 'files listed by the user'}",
    ])
