"""The baseline a PyTorch user would pick instead of hvdtrain: DDP (gloo) with its communication hooks.

One rank of `hvdtrain bench compression`'s DDP runs: the same model, data order, optimizer and learning-rate
schedule as the `hvdtrain train` runs it is compared with (built from the same config keys through
hvdtrain's own pieces), trained with torch.nn.parallel.DistributedDataParallel and, per `--hook`:
  none      DDP's own bucketed allreduce (fp32);
  fp16      default_hooks.fp16_compress_hook;
  bf16      default_hooks.bf16_compress_hook's body (DDP refuses the hook itself on CPU: `bf16_on_cpu`);
  powersgd  powerSGD_hook.powerSGD_hook with PowerSGDState (rank, start step and min rate from the
            compression.powersgd_* keys, as hvdtrain's powersgd uses them), in one bucket (`ddp_model`).
Rank 0 writes metrics.jsonl with hvdtrain's keys (epoch, step, samples_per_s, bytes_per_step,
test_accuracy), so both kinds of run are read alike. Bytes per step are what this rank handed to
allreduce: counted by wrapping torch.distributed.all_reduce for the hooks, 4 bytes per parameter for
DDP's own path (every bucket, every step).
Launch: torchrun on one machine, or mpirun (the namespace hosts), where the rendezvous comes from
Open MPI's variables and MASTER_ADDR/MASTER_PORT.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path


def bf16_on_cpu(process_group, bucket):
    """default_hooks.bf16_compress_hook's own body under another name: DDP refuses that hook by name
    unless CUDA 11+ and NCCL 2.10+ are there (DistributedDataParallel._check_comm_hook), though gloo
    allreduces bfloat16 CPU tensors."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)


def ddp_model(name: str, cfg, module):
    """`module` in DDP with communication hook `name` registered (see the module docstring).

    PowerSGD gets one bucket for all gradients. powerSGD_hook issues its P and Q allreduces from
    Future.then() callbacks, which run on gloo's two worker threads and block there; while one bucket's
    chain runs, DDP hands the next bucket to the hook. Both workers can then block (the job hangs), or
    the ranks enqueue their collectives in different orders, which gloo pairs by tag ("op.preamble.length
    <= op.nbytes ... Received data size doesn't match expected size"). DDP's default buckets (a 1 MB first
    one, then 25 MB) split this MLP in two, so it failed at step start_powerSGD_iter, its first compressed
    step; with one bucket it runs. bucket_cap_mb must be passed explicitly: only the default leaves the
    1 MB first bucket.
    """
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name != "powersgd":
        model = torch.nn.parallel.DistributedDataParallel(module)
        if name != "none":
            model.register_comm_hook(None, default_hooks.fp16_compress_hook if name == "fp16" else bf16_on_cpu)
        return model
    gradient_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    model = torch.nn.parallel.DistributedDataParallel(module, bucket_cap_mb=max(25.0, gradient_mb + 1))
    state = powerSGD_hook.PowerSGDState(
        process_group=None, matrix_approximation_rank=cfg.compression.powersgd_rank,
        start_powerSGD_iter=max(2, cfg.compression.powersgd_start_step),  # PyTorch asks for at least 2
        min_compression_rate=cfg.compression.powersgd_min_rate,
        warm_start=cfg.compression.powersgd_warm_start, use_error_feedback=True)
    model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return model


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from hvdtrain import config, schedule
    from hvdtrain.bench import end_torch_distributed
    from hvdtrain.data import Dataset
    from hvdtrain.torch.trainer import build_model
    from hvdtrain.world import world

    rank, size = world.rank, world.size  # no Horovod here: the launcher's (mpirun's or the bench's RANK)
    cfg = config.load(None, args.override)
    torch.set_num_threads(1)  # one core per rank, as the hvdtrain runs it is compared with
    dist.init_process_group("gloo", rank=rank, world_size=size)
    sent = {"bytes": 0}
    all_reduce = dist.all_reduce

    def counted(tensor, *a, **k):  # what the hooks hand to allreduce (DDP's own path is counted below)
        sent["bytes"] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *a, **k)

    dist.all_reduce = counted
    data = Dataset(cfg.data, cfg.seed, cfg.task)
    rank_data = data.for_rank(cfg.train.batch_size, rank, size)
    model = ddp_model(args.hook, cfg, build_model(cfg, data.sample_shape, data.num_classes))
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    per_epoch = rank_data.steps_per_epoch
    total = per_epoch * cfg.train.epochs
    log = open(Path(args.run_dir) / "metrics.jsonl", "w") if rank == 0 else None
    step = 0
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        seconds, sent["bytes"] = 0.0, 0
        for x, y in rank_data.batches(step, step + per_epoch):
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = schedule.learning_rate(cfg.train, step, size, total)
            optimizer.zero_grad()
            F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y).long()).backward()
            optimizer.step()
            seconds += time.perf_counter() - started
            step += 1
        model.eval()
        correct = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for x, y in rank_data.eval_batches():
                predicted = model.module(torch.from_numpy(x)).argmax(1)
                correct += torch.tensor([(predicted == torch.from_numpy(y)).sum().item(), len(y)], dtype=torch.float64)
        all_reduce(correct)
        slowest = torch.tensor([seconds], dtype=torch.float64)
        all_reduce(slowest, op=dist.ReduceOp.MAX)
        hooked = sent["bytes"] / per_epoch
        if log is not None:
            log.write(json.dumps({
                "epoch": epoch, "step": step, "samples_per_s": per_epoch * cfg.train.batch_size * size / slowest.item(),
                "bytes_per_step": hooked if args.hook != "none" else 4.0 * parameters,
                "compression": f"ddp:{args.hook}", "test_accuracy": (correct[0] / correct[1]).item(),
                "world_size": size}) + "\n")
            log.flush()
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).digest()
    digest = torch.tensor([int.from_bytes(weights[:7], "little")], dtype=torch.int64)
    digests = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(digests, digest)
    if log is not None:
        log.close()
        with open(Path(args.run_dir) / "summary.json", "w") as handle:
            json.dump({"weights_identical": len({d.item() for d in digests}) == 1, "steps": step,
                       "hook": args.hook, "world_size": size}, handle)
    end_torch_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m hvdtrain.bench.ddp")
    parser.add_argument("--hook", choices=["none", "fp16", "bf16", "powersgd"], required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("override", nargs="*", help="config keys, as for hvdtrain train")
    worker(parser.parse_args())
