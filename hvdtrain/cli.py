"""`hvdtrain` console script: parses arguments and dispatches; the work lives in the modules."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hvdtrain.errors import UserError


def _rank_prefix() -> str:
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return f"rank {os.environ[var]}: "
    return ""


def _train(args: argparse.Namespace) -> int:
    from hvdtrain import config, data

    cfg = config.load(args.config, args.overrides)
    dataset = data.Dataset(cfg.data, cfg.seed)
    from hvdtrain.torch.trainer import train

    summary = train(cfg, dataset, Path(args.run_dir), args.resume)
    if _rank_prefix() in ("", "rank 0: "):
        final = summary["final"]
        print(f"run directory: {Path(args.run_dir).resolve()}  "
              f"test_accuracy {final.get('test_accuracy', float('nan')):.4f}")
    return 0


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
