"""Sharded save throughput: Checkpointer(format='sharded') against plain dcp.save, two CPU ranks (gloo).

    python benchmarks/sharded_save.py            # 512 MiB of parameters (1.5 GiB with Adam's state), 7 repetitions
    python benchmarks/sharded_save.py --quick    # 64 MiB, 2 repetitions
    python benchmarks/sharded_save.py --world 4

The script starts `--world` ranks of itself. Each holds a `fully_shard`-ed stack of linear layers
and the Adam state of one step, so a rank writes a 1/world share of parameters and moments.
Variants, alternated round by round, each into a fresh folder (an os.sync and the removal of the
files after each, untimed):

* dcp_save: `dcp.save({model, optimizer} of get_state_dict, storage_writer=FileSystemWriter(folder))`
  with DCP's default `sync_files=True`, what a hand-written loop would do.
* checkpointer: one `Checkpointer(..., format='sharded')` epoch end: the same shards hashed as
  they are written and fsynced, the random states of every rank gathered into the payload, rank
  zero's gathering of sizes and checksums, publish, manifest commit.
* checkpointer_async: the same with `async_save=True`, timing only what the training thread waits
  for at the epoch end (each rank's copy of its shards in host memory, and the plan); the ranks'
  save workers write and commit after that, untimed (the end of the loop waits for them).

A round's time is the slowest rank's, from a barrier before the save to the end of it. Throughput
per rank is the bytes of a rank's shards over that time. Target: checkpointer / dcp_save <= 1.10
(ratio of medians).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import _common as common
import torch
import torch.distributed as dist


def build(mib: int, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    width = 1024
    layers = max(1, mib * common.MiB // (4 * width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def rank_main(args: Any) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from checkpoint_hooks.torch import Checkpointer

    dist.init_process_group("gloo", init_method="file://" + args.rendezvous, rank=args.rank, world_size=args.world)
    rank = args.rank
    model, optimizer = build(args.mib, args.world)
    local_bytes = sum(p.to_local().numel() * 4 for p in model.parameters()) * 3  # parameters and Adam's two moments
    counter = iter(range(10**6))

    def folder() -> str:
        path = os.path.join(args.root, f"run{next(counter)}")
        if rank == 0:
            common.fresh(path)
        dist.barrier()
        return path

    def timed(save: Any) -> float:
        dist.barrier()
        started = time.perf_counter()
        save()
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed.item())

    def dcp_variant() -> float:
        path = folder()
        def save() -> None:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp_save({"model": model_state, "optimizer": optimizer_state}, storage_writer=FileSystemWriter(path))

        return timed(save)

    def checkpointer_variant() -> float:
        path = folder()
        ckpt = Checkpointer(model, optimizer, dirpath=path, format="sharded", top_k=0)
        seconds = 0.0
        for _ in ckpt.epochs(1):
            seconds = timed(ckpt.epoch_end)
        return seconds

    def async_variant() -> float:
        path = folder()
        ckpt = Checkpointer(model, optimizer, dirpath=path, format="sharded", top_k=0, async_save=True)
        seconds = 0.0
        for _ in ckpt.epochs(1):
            seconds = timed(ckpt.epoch_end)  # the copy; the workers write, and the loop's end waits for them
        return seconds

    def between() -> None:
        dist.barrier()
        os.sync()
        if rank == 0:
            for name in os.listdir(args.root):
                shutil.rmtree(os.path.join(args.root, name), ignore_errors=True)
        dist.barrier()
        time.sleep(0.2)

    variants = {"dcp_save": dcp_variant, "checkpointer": checkpointer_variant, "checkpointer_async": async_variant}
    times = common.alternate(variants, args.reps, between=between, log=rank == 0)
    if rank == 0:
        ours, base = times["checkpointer"], times["dcp_save"]
        common.emit({
            "benchmark": "sharded_save",
            "world_size": args.world,
            "parameters_MiB": args.mib,
            "bytes_per_rank": local_bytes,
            "repetitions": args.reps,
            "dcp_save": common.summary(base),
            "checkpointer": common.summary(ours),
            "MiB_per_s_per_rank": {
                "dcp_save": round(local_bytes / common.median(base) / common.MiB, 1),
                "checkpointer": round(local_bytes / common.median(ours) / common.MiB, 1),
            },
            "ratio_checkpointer_over_dcp_save": common.ratio(ours, base),
            "paired_ratio": common.paired_ratio(ours, base),
            "ratio_95_interval": common.ratio_interval(ours, base),
            "target": 1.10,
            "met": common.ratio(ours, base) <= 1.10,
            "checkpointer_async_training_thread": common.summary(times["checkpointer_async"]),
            "ratio_async_training_thread_over_dcp_save": common.ratio(times["checkpointer_async"], base),
            "machine": common.machine(),
        })
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks (processes) to start (default 2)")
    p.add_argument("--mib", type=int, default=None, help="MiB of parameters in all (default 512; --quick 64)")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rendezvous", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    mib = args.mib if args.mib is not None else (64 if args.quick else 512)
    repetitions = common.reps(args, default=7)
    common.note(f"{args.world} ranks, {mib} MiB of parameters, {repetitions} repetitions ...")
    with common.workdir(args, "sharded") as root:
        ranks = [
            subprocess.Popen([sys.executable, __file__, "--rank", str(rank), "--world", str(args.world), "--mib", str(mib),
                              "--reps", str(repetitions), "--rendezvous", os.path.join(root, "rdv"),
                              "--root", os.path.join(root, "saves")], env={**os.environ, "OMP_NUM_THREADS": "1"})
            for rank in range(args.world)
        ]
        codes = [proc.wait() for proc in ranks]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")


if __name__ == "__main__":
    main()
