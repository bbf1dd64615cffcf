"""One rank of a sharded training run for tests/torch/test_sharded.py (FSDP2 on CPU, gloo).

    python sharded_script.py --rank R --world W --rendezvous FILE --dir DIR --out PREFIX --epochs N [faults]

A `fully_shard`-ed MLP with dropout trains with Adam on per-rank shuffled batches; each rank
draws from its own generator, so a resume that restored one rank's random states but not the
others' would drift. The validation losses are a fixed sequence, so the kept set depends only on
the epochs saved. It writes PREFIX{rank}.json: the epochs trained, a digest of the full model and
optimizer state at the start and after each epoch (rank 0), and the error that ended it, if any.
With --world 1 it still initializes a one-rank process group. --dir may be a URL (s3://...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from checkpoint_hooks.core.errors import SaveError
from checkpoint_hooks.core.store import FsspecStore
from checkpoint_hooks.torch import Checkpointer, sharded

VAL_LOSS = [0.9, 0.7, 0.8, 0.5, 0.6, 0.4, 0.45, 0.3, 0.35, 0.2]


def digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """A hash of the full (unsharded) model and optimizer state on rank 0; None elsewhere."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None
    h = hashlib.sha256()

    def feed(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                feed(f"{prefix}/{key}", value[key])
        elif isinstance(value, torch.Tensor):
            h.update(prefix.encode())
            h.update(value.detach().contiguous().cpu().numpy().tobytes())
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                feed(f"{prefix}/{i}", item)
        else:
            h.update(f"{prefix}={value!r}".encode())

    feed("model", model_state)
    feed("optim", optim_state)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--rendezvous", "--dir", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--fault-rank", type=int, default=0)
    p.add_argument("--kill-after-epoch", type=int)  # SIGKILL once this epoch's save committed
    p.add_argument("--die-in-save-at-epoch", type=int)  # SIGKILL after the shards are written, before the commit
    p.add_argument("--fail-save-at-epoch", type=int)  # this rank's shard write raises OSError
    p.add_argument("--fail-upload-at-epoch", type=int)  # a remote store: this rank's upload raises after it uploaded
    p.add_argument("--on-save-error", default="raise")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--fail-copy-at-epoch", type=int)  # with --async-save: this rank's copy to host memory fails
    a = p.parse_args()

    dist.init_process_group("gloo", init_method="file://" + a.rendezvous, rank=a.rank, world_size=a.world)
    mesh = init_device_mesh("cpu", (a.world,))
    torch.manual_seed(0)
    data = torch.randn(64, 8)
    target = data.sum(dim=1, keepdim=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(1000 + a.rank)  # each rank its own shuffling and dropout

    current = {"epoch": -1}

    def saving(args: object) -> int:
        """The epoch of the save at hand: in its file names (a background save runs while training goes on)."""
        named = re.search(r"epoch=(\d+)", repr(args))
        return int(named.group(1)) if named else current["epoch"]
    mine = a.rank == a.fault_rank
    remote = "://" in a.dir
    if mine and a.die_in_save_at_epoch is not None:
        # a remote store: rank 0 once every rank uploaded its files, before the commit; the others once their
        # files are uploaded, before they report to rank 0.  A shared directory: once every file is written.
        if remote:
            owner, hook, after = (sharded, "_place", True) if a.rank == 0 else (FsspecStore, "publish", True)
        else:
            owner, hook, after = sharded, "_remember" if a.rank == 0 else "_own_files", False
        original = getattr(owner, hook)

        def maybe_die(args: tuple[object, ...]) -> None:
            if saving(args) == a.die_in_save_at_epoch:
                os.kill(os.getpid(), signal.SIGKILL)

        def die(*args: object, **kwargs: object) -> object:
            if not after:
                maybe_die(args)
            result = original(*args, **kwargs)
            maybe_die(args)
            return result

        setattr(owner, hook, die)
    if mine and a.fail_copy_at_epoch is not None:
        copy_state = sharded.copy

        def no_memory(state: dict[str, object]) -> dict[str, object]:
            if current["epoch"] == a.fail_copy_at_epoch:
                raise MemoryError("no host memory left for the copy (injected)")
            return copy_state(state)

        sharded.copy = no_memory  # type: ignore[assignment]
    if mine and a.fail_upload_at_epoch is not None:
        upload = FsspecStore.publish

        def lost(self: FsspecStore, *args: object, **kwargs: object) -> None:
            upload(self, *args, **kwargs)  # type: ignore[arg-type]
            if current["epoch"] == a.fail_upload_at_epoch:
                raise ConnectionError("connection reset after the upload (injected)")

        FsspecStore.publish = lost  # type: ignore[method-assign]
    if mine and a.fail_save_at_epoch is not None:
        write_data = sharded._Writer.write_data

        def fail(self: object, *args: object, **kwargs: object) -> object:
            if saving(self.path) == a.fail_save_at_epoch:  # type: ignore[attr-defined]
                raise OSError(28, "No space left on device (injected)")
            return write_data(self, *args, **kwargs)  # type: ignore[arg-type]

        sharded._Writer.write_data = fail  # type: ignore[method-assign]

    threads: set[str] = set()  # where this rank's shards were written: the training thread, or a save worker
    save = sharded.save

    def noting_the_thread(*args: object, **kwargs: object) -> None:
        threads.add(threading.current_thread().name.rsplit("_", 1)[0])
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)  # training goes on meanwhile: what is written must be the copy made at the save
        save(*args, **kwargs)  # type: ignore[arg-type]

    sharded.save = noting_the_thread  # type: ignore[assignment]
    report: dict[str, object] = {"trained": [], "epochs": {}, "start": None, "error": None}
    out = f"{a.out}{a.rank}.json"
    ckpt = Checkpointer(model, optimizer, dirpath=a.dir, format="sharded", monitor="val_loss", top_k=2,
                        on_save_error=a.on_save_error, async_save=a.async_save)
    try:
        for epoch in ckpt.epochs(a.epochs):
            current["epoch"] = epoch
            if not report["trained"]:  # the first epoch of this run
                report["start"] = digest(model, optimizer)
                report["resumed_from"] = ckpt.resumed_from.record.name if ckpt.resumed_from and ckpt.resumed_from.record else None
            report["trained"].append(epoch)  # type: ignore[union-attr]
            order = torch.randperm(64)
            for i in range(0, 64, 16):
                batch = order[i : i + 16]
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(data[batch]), target[batch]).backward()
                optimizer.step()
                ckpt.step()
            ckpt.epoch_end(val_loss=VAL_LOSS[epoch])
            report["epochs"][str(epoch)] = digest(model, optimizer)  # type: ignore[index]
            print(f"saved {epoch}", flush=True)
            if mine and a.kill_after_epoch == epoch:
                os.kill(os.getpid(), signal.SIGKILL)
    except SaveError as exc:
        report["error"] = str(exc)
    report["best"] = ckpt.best_model_path
    report["threads"] = sorted(threads)
    report["final"] = digest(model, optimizer)
    report["rng"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    with open(out, "w") as f:
        json.dump(report, f)
    dist.barrier()  # every rank is done with the others
    # Leave without tearing gloo down: a rank whose peer closed its connections first can abort in
    # gloo's teardown ("terminate called without an active exception"), which is not what is tested.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3 if report["error"] else 0)


if __name__ == "__main__":
    main()
