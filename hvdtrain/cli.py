"""`hvdtrain` console script: parses arguments and dispatches; the work lives in the modules."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from hvdtrain.errors import UserError


def _rank_prefix() -> str:
    from hvdtrain.world import world

    return f"rank {world.rank}: " if world.launched else ""


def _train(args: argparse.Namespace) -> int:
    from hvdtrain import config, data, faults, runtime
    from hvdtrain.world import world

    cfg = config.load(args.config, args.overrides)
    dataset = data.Dataset(cfg.data, cfg.seed, cfg.task)
    train = runtime.framework_trainer(cfg.framework)
    with faults.FailureRelay(Path(args.run_dir)):
        summary = train(cfg, dataset, Path(args.run_dir), args.resume)
    if world.is_root:
        headline = summary["headline"]
        print(f"run directory: {Path(args.run_dir).resolve()}  "
              f"{headline} {summary['final'].get(headline, float('nan')):.4f}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from hvdtrain import config, data

    from hvdtrain import models

    cfg = config.load(args.config, args.overrides)
    dataset = data.Dataset(cfg.data, cfg.seed, cfg.task)
    labels = (f"{dataset.num_classes} classes" if dataset.task.classes else f"targets {tuple(dataset.label_shape)}")
    if cfg.task == "segmentation":
        labels = f"masks {tuple(dataset.label_shape)}, {labels}"
    print(f"config ok: {cfg.framework}, task {cfg.task}, model {models.source(cfg)}, data {cfg.data.source} "
          f"(samples {tuple(dataset.sample_shape)} channels first, {labels})")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from hvdtrain.quantize import stage

    report = stage.run(Path(args.run_dir), args.format, args.calibration, args.max_metric_drop,
                       args.calibration_data, args.dynamic)
    for fmt in report["formats"]:
        print(f"{fmt['format']}: {fmt['int8']['name']}: {report['metric']} {fmt['fp32']['score']:.4f} -> "
              f"{fmt['int8']['score']:.4f}, size x{fmt['size_ratio']:.2f}, batch-1 speed-up "
              f"{fmt['speedup_b1']:.2f}x, batch-32 {fmt['speedup_b32']:.2f}x")
    print(f"report: {Path(args.run_dir) / 'quantize' / 'quantize_report.md'}")
    return 0


def _data_shard(args: argparse.Namespace) -> int:
    from hvdtrain.shards import writer
    from hvdtrain.sources import open_source

    splits = open_source(args.source, args.test_fraction, args.seed, args.synthetic_shape, args.synthetic_classes,
                         args.synthetic_count, origin="--source", task=args.task,
                         hdf5_options={"x_key": args.x_key, "y_key": args.y_key,
                                       "one_sample": args.one_sample_per_file})
    written = writer.write_splits(splits, Path(args.out), args.shards, args.chunk_samples,
                                  None if args.compression == "none" else args.compression)
    for split, shard_set in written.items():
        if shard_set is not None:
            print(f"wrote {Path(args.out) / split}: {shard_set.total} samples in {len(shard_set.shards)} shards")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from hvdtrain import workloads

    out = Path(args.out)
    if args.kind == "deepcam":
        height, width, channels = args.shape or (32, 48, 4)
        written = workloads.write_deepcam(out, args.samples, args.test_samples, height, width, channels,
                                          args.dtype, args.seed)
    else:
        written = workloads.write_cosmoflow(out, args.samples, args.test_samples, (args.shape or [16])[0],
                                            args.per_file, args.seed)
    print(f"wrote {out}: {written['train']} train and {written['test']} test samples of shape "
          f"{tuple(written['sample'])} ({args.kind} layout)")
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from hvdtrain.shards.index import sets_under, verify

    for shard_set in sets_under(args.path, args.x_key, args.y_key, args.one_sample_per_file, args.task != "regression"):
        for line in verify(shard_set):
            print(line)
        print(f"verified {shard_set.split}: {len(shard_set.shards)} shards, {shard_set.total} samples")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from hvdtrain.shards.index import describe, sets_under

    sets = sets_under(args.path, args.x_key, args.y_key, args.one_sample_per_file, args.task != "regression")
    print("\n".join(describe(s) for s in sets))
    return 0


def _bench_loader(args: argparse.Namespace) -> int:
    from hvdtrain.bench import loader

    loader.run(Path(args.dir), args.size_gb, args.batch_size, args.workers, args.naive_seconds,
               args.shuffle_buffer_mb, args.epochs, Path(args.out) if args.out else None)
    return 0


def _bench_scaling(args: argparse.Namespace) -> int:
    from hvdtrain.bench import scaling

    scaling.sweep(args)
    return 0


def _bench_allreduce(args: argparse.Namespace) -> int:
    from hvdtrain.bench import allreduce

    allreduce.sweep(args)
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from hvdtrain.bench import report

    built = report.build(Path(args.results_dir), Path(args.out) if args.out else None)
    print(f"wrote {Path(args.out or args.results_dir) / 'report.md'} with {len(built['plots'])} plots")
    return 0


def _bench_frameworks(args: argparse.Namespace) -> int:
    from hvdtrain.bench import frameworks

    frameworks.run(args.np, args.overrides, Path(args.out) if args.out else None)
    return 0


def _bench_quantize(args: argparse.Namespace) -> int:
    from hvdtrain.bench import quantize

    quantize.run(Path(args.out) if args.out else None)
    return 0


def _bench_compression(args: argparse.Namespace) -> int:
    from hvdtrain.bench import compression

    baselines = compression.BASELINES if args.baselines is None else tuple(args.baselines)
    over_gloo = compression.OVER_GLOO if args.gloo is None else tuple(args.gloo)
    compression.run(args.links, Path(args.out) if args.out else None, tuple(args.methods or compression.METHODS),
                    baselines, args.epochs, over_gloo)
    return 0


def _numbers(kind: type, example: str):
    """argparse type for comma-separated numbers, e.g. `1,2,4`."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}, got {text!r}")
    return parse


_ints, _floats, _shape = _numbers(int, "1,2,4"), _numbers(float, "0.25,1,64"), _numbers(int, "3,64,64")


def _mca_parameter(text: str) -> str:
    """argparse type for an Open MPI parameter, NAME=VALUE."""
    name, _, value = text.partition("=")
    if not name or not value or not name.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE like coll_tuned_allreduce_algorithm=3, got {text!r}")
    return text


def _names(what: str, allowed: Callable[[], Sequence[str]]):
    """argparse type for a comma-separated subset of `allowed()` (imported only when the option is used)."""
    def parse(text: str) -> list[str]:
        names, known = text.split(","), allowed()
        unknown = set(names) - set(known)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {sorted(unknown)}: use {', '.join(known)}")
        return names
    return parse


def _scaling_modes() -> Sequence[str]:
    from hvdtrain.bench.scaling import MODES
    return MODES


def _compression_methods() -> Sequence[str]:
    from hvdtrain.config import choices
    return choices("compression.method")


def _compression_baselines() -> Sequence[str]:
    from hvdtrain.bench.compression import BASELINES
    return BASELINES


_modes, _methods = _names("mode(s)", _scaling_modes), _names("method(s)", _compression_methods)
_baselines = _names("baseline(s)", _compression_baselines)


def _add_layout_arguments(command: argparse.ArgumentParser) -> None:
    """How users' HDF5 files are laid out (the data.* keys of the same names)."""
    from hvdtrain.config import TASKS

    command.add_argument("--x-key", default="x", help="HDF5 files: the samples' dataset")
    command.add_argument("--y-key", default="y", help="HDF5 files: the labels' dataset")
    command.add_argument("--one-sample-per-file", action="store_true", help="HDF5 files: no sample axis")
    command.add_argument("--task", default="classification", choices=TASKS,
                         help="what the labels are: class ids (classification, segmentation masks) or float targets")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="hvdtrain", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model data-parallel with Horovod",
                           description="Train with Horovod. Launch ranks with horovodrun, mpirun or srun.")
    train.add_argument("--config", help="YAML config file (see configs/)")
    train.add_argument("--run-dir", required=True, help="directory for config, metrics, checkpoints, summary")
    train.add_argument("--resume", default="auto",
                       help="auto (latest checkpoint in the run dir, if any), none, or a checkpoint path")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override config keys, e.g. train.batch_size=64 model.name=mlp")
    train.set_defaults(handler=_train)

    check = sub.add_parser("check", help="validate a config and open its data, without training "
                                         "(job scripts run it before launching ranks)")
    check.add_argument("--config", help="YAML config file")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.set_defaults(handler=_check)

    quantize = sub.add_parser("quantize", help="int8 edge models (ONNX, TFLite) with a metric guard")
    quantize.add_argument("--run-dir", required=True, help="a finished training run")
    quantize.add_argument("--format", choices=["auto", "onnx", "tflite", "both"], default="auto",
                          help="onnx for PyTorch runs, tflite for TensorFlow runs (auto/both: the run's own)")
    quantize.add_argument("--calibration", type=int, default=512, help="training samples for calibration")
    quantize.add_argument("--max-metric-drop", "--max-accuracy-drop", dest="max_metric_drop", type=float,
                          default=0.5, help="how much worse int8 may be on the run's headline metric: points "
                                            "(x100) of accuracy or IoU, percent of fp32's mse/mae")
    quantize.add_argument("--calibration-data", help="calibrate on this shard set instead of the training data")
    quantize.add_argument("--dynamic", action="store_true", help="ONNX dynamic int8 (weights only) instead of static")
    quantize.set_defaults(handler=_quantize)

    data = sub.add_parser("data", help="write, verify and inspect HDF5 shard sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    shard = data_sub.add_parser("shard", help="write train/ and test/ shard sets from a source")
    shard.add_argument("--source", required=True,
                       help="digits, synthetic, npz:PATH (arrays x, y), npy:DIR or DIR: a directory of "
                            "x.npy/y.npy or NAME_x.npy/NAME_y.npy pairs (the in-memory sources training reads), "
                            "or hdf5:PATH: your own HDF5 files (a directory, a glob or a file), converted once")
    shard.add_argument("--out", required=True, help="output directory (gets train/ and test/)")
    shard.add_argument("--shards", type=int, default=4,
                       help="shards in the train set (the test set gets as many, at most one per sample)")
    shard.add_argument("--chunk-samples", type=int, help="samples per HDF5 chunk (default: about 1 MiB)")
    shard.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
    shard.add_argument("--test-fraction", type=float, default=0.2)
    shard.add_argument("--seed", type=int, default=42)
    shard.add_argument("--synthetic-shape", type=_shape, default=[3, 64, 64])
    shard.add_argument("--synthetic-classes", type=int, default=10)
    shard.add_argument("--synthetic-count", type=int, default=10000)
    _add_layout_arguments(shard)
    shard.set_defaults(handler=_data_shard)
    synth = data_sub.add_parser("synth", help="write synthetic science data in real workloads' layouts "
                                              "(DeepCAM segmentation, CosmoFlow regression)")
    synth.add_argument("--kind", required=True, choices=["deepcam", "cosmoflow"])
    synth.add_argument("--out", required=True, help="output directory (gets train/, test/ and, for deepcam, stats.h5)")
    synth.add_argument("--samples", type=int, default=256, help="training samples")
    synth.add_argument("--test-samples", type=int, default=64)
    synth.add_argument("--shape", type=_shape, help="deepcam: H,W,C (default 32,48,4); cosmoflow: the volume's side (16)")
    synth.add_argument("--dtype", default="float32", choices=["float16", "float32"], help="deepcam fields")
    synth.add_argument("--per-file", type=int, default=8, help="cosmoflow: samples per file")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_data_synth)
    for name, handler, text in (("verify", _data_verify, "check checksums, schema, counts and labels"),
                                ("inspect", _data_inspect, "summarise a shard set")):
        command = data_sub.add_parser(name, help=text)
        command.add_argument("path", help="a shard set, a `data shard` output, HDF5 files or a glob")
        _add_layout_arguments(command)
        command.set_defaults(handler=handler)

    bench = sub.add_parser("bench", help="benchmarks that print their figures")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    loader = bench_sub.add_parser("loader", help="shard reader vs raw HDF5 read vs a naive per-sample loader")
    loader.add_argument("--dir", default="data/bench-loader", help="where the synthetic set is (re)used")
    loader.add_argument("--size-gb", type=float, default=2.0)
    loader.add_argument("--batch-size", type=int, default=32)
    loader.add_argument("--workers", type=_ints, default=[0, 2], help="e.g. 0,2")
    loader.add_argument("--shuffle-buffer-mb", type=float, default=64)
    loader.add_argument("--epochs", type=int, default=3, help="passes over the set per loader")
    loader.add_argument("--naive-seconds", type=float, default=20, help="time cap for the naive loader")
    loader.add_argument("--out", help="write the figures as JSON here")
    loader.set_defaults(handler=_bench_loader)

    from hvdtrain.bench.scaling import add_model_arguments
    scale = bench_sub.add_parser("scaling", help="throughput on every rank: Horovod vs DDP vs no communication")
    scale.add_argument("--np", type=_ints, default=[1, 2], help="rank counts, e.g. 1,2,4")
    scale.add_argument("--modes", type=_modes, default=["horovod", "horovod-default", "ddp", "nocomm"])
    scale.add_argument("--out", default="benchmarks/results", help="results directory (report reads it)")
    scale.add_argument("--timeout", type=float, default=600, help="seconds per job")
    scale.add_argument("--links", type=lambda t: t.split(","), default=["loopback"],
                       help="loopback and/or tc-capped namespace links such as 1gbit,10gbit (needs root): on a "
                            "capped link the communicating modes run at 2 ranks, one per namespace host")
    scale.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    scale.add_argument("--timeline", action="store_true",
                       help="write Horovod's timeline of the first run of each Horovod job to OUT/timeline-MODE-npN.json "
                            "(open in chrome://tracing)")
    add_model_arguments(scale)
    scale.set_defaults(handler=_bench_scaling)

    from hvdtrain.bench.allreduce import DEFAULT_SIZES_MB, DTYPES, IMPLEMENTATIONS
    ring = bench_sub.add_parser("allreduce", help="allreduce bus bandwidth over message sizes")
    ring.add_argument("--np", type=int, default=2)
    ring.add_argument("--impls", type=lambda t: t.split(","), default=list(IMPLEMENTATIONS),
                      help=f"comma-separated: {', '.join(IMPLEMENTATIONS)}")
    ring.add_argument("--sizes", type=_floats, default=list(DEFAULT_SIZES_MB), help="message sizes in MiB")
    ring.add_argument("--links", type=lambda t: t.split(","), default=["loopback"],
                      help="loopback and/or tc-capped namespace links such as 1gbit,10gbit (needs root)")
    ring.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="element type: float16 is what compression.method=fp16 sends (mpi4py is left out: "
                           "MPI has no float16 sum)")
    ring.add_argument("--gap-ms", type=float, default=0.0,
                      help="idle milliseconds before each call, as a training step's compute leaves")
    ring.add_argument("--repeats", type=int, default=0, help="calls timed per size (default: by size, 5 to 200)")
    ring.add_argument("--mca", action="append", default=[], metavar="NAME=VALUE", type=_mca_parameter,
                      help="an Open MPI parameter for the MPI-launched ranks (repeatable), e.g. "
                           "coll_tuned_allreduce_algorithm=3")
    ring.add_argument("--out", default="benchmarks/results")
    ring.add_argument("--timeout", type=float, default=600)
    ring.set_defaults(handler=_bench_allreduce)

    compare = bench_sub.add_parser("frameworks", help="PyTorch vs TensorFlow training throughput")
    compare.add_argument("--np", type=_ints, default=[1, 2])
    compare.add_argument("--out", help="write the figures as JSON here")
    compare.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    compare.set_defaults(handler=_bench_frameworks)

    quantized = bench_sub.add_parser("quantize", help="int8 vs fp32: digits CNN and a ResNet-style CNN")
    quantized.add_argument("--out", help="write the figures as JSON here")
    quantized.set_defaults(handler=_bench_quantize)

    compress = bench_sub.add_parser("compression", help="step time and bytes per compression mode, per link "
                                                        "(network namespaces with tc-capped links; needs root)")
    compress.add_argument("--links", type=lambda t: t.split(","), default=["loopback", "10gbit", "1gbit"],
                          help="loopback and/or tc rates such as 1gbit, 10gbit")
    compress.add_argument("--methods", type=_methods, default=None,
                          help="comma-separated compression modes to time (none is always timed: the baseline)")
    compress.add_argument("--baselines", type=lambda t: _baselines(t) if t else [], default=None,
                          help="comma-separated DDP baselines (default: all of ddp:none,ddp:fp16,ddp:bf16,"
                               "ddp:powersgd; an empty string: none)")
    compress.add_argument("--gloo", type=lambda t: _methods(t) if t else [], default=None,
                          help="compression modes also timed with Horovod over Gloo, rows gloo:METHOD (default: "
                               "none,fp16; an empty string: none)")
    compress.add_argument("--epochs", type=int, default=8, help="epochs of the digits per job (8: 360 steps)")
    compress.add_argument("--out", help="write the figures as JSON here (and a PNG plot per link beside it)")
    compress.set_defaults(handler=_bench_compression)

    report = bench_sub.add_parser("report", help="report.md, report.json and plots from benchmark results")
    report.add_argument("results_dir")
    report.add_argument("--out", help="where to write (default: the results directory)")
    report.set_defaults(handler=_bench_report)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        if not exc.quiet:
            print(f"hvdtrain: {_rank_prefix()}error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hvdtrain: {_rank_prefix()}interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
