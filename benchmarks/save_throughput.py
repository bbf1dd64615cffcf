"""Save throughput: a 1 GiB float32 state saved through the engine vs plain torch.save.

    python benchmarks/save_throughput.py            # 1 GiB, 7 repetitions per variant
    python benchmarks/save_throughput.py --quick    # 64 MiB, 2 repetitions

Variants, interleaved round by round in a shuffled order (os.sync(), the removal of the
files and a short pause after each, untimed, so no variant pays for another one's dirty pages):

* torch_save_weights / torch_save_training_state: `torch.save(obj, path)` into a fresh folder.
* engine_weights / engine_training_state: `Engine.save(...)` whose writer is the Lightning
  adapter's `save_torch` (what it does for `weights`, and for `training_state` with Lightning's
  default checkpoint IO, whose dict is modelled here by model + Adam-like optimizer tensors):
  torch.save into a `DurableFile`, which hashes the bytes (xxh3-128) on a second thread as they
  are written and starts their writeback every 32 MiB, with torch's own zip CRC32 off (our
  checksum covers the file). With checksums (verify=True): write, fsync, rename, sidecar,
  manifest commit.
* engine_plain_weights: the engine with a writer that calls `torch.save(obj, path)` itself, as
  an arbitrary writer would: the writeback of the growing file starts while it is written, then
  the file is hashed by reading it back while an fsync runs beside.
* torch_save_null_crc / torch_save_null_nocrc: torch.save of the weights into a file object that
  discards the bytes, with and without torch's CRC32: what that CRC costs, without the disk.
* torch_save_fsync_*: the same torch.save followed by an fsync of the file: a durable torch.save,
  for reference (not the target's baseline).
* raw_write / raw_write_fsync: the tensors' bytes written sequentially with large writes, without
  and with a final fsync: the page-cache limit and the physical limit of this disk.

Target: engine / torch.save <= 1.10 (median of each variant). The engine's time is broken down
into write, hash, fsync_wait, fsync, rename, manifest and other, measured by wrapping the functions
the engine calls (its writer, which for a DurableFile includes the fsync it makes as it closes;
`take_written` (the checksum a DurableFile computed) and `checksum_file` (a read-back);
`durable.syncing` (the wait for the fsync that runs beside a read-back, once it is done);
`_fsync_path` on files, `LocalStore.publish`, `CheckpointDirectory.commit` / `commit_change`);
each part is exclusive of the parts inside it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import _common as common
import torch

import checkpoint_hooks.core.store as store_module
import checkpoint_hooks.core.transaction as transaction_module
from checkpoint_hooks.core import durable as durable_module
from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.engine import Engine, SaveItem
from checkpoint_hooks.policy import CheckpointPolicy
from checkpoint_hooks.torch.io import save_torch

EXTENSIONS = {"training_state": ".ckpt", "weights": ".weights.pt"}


# -- the state ------------------------------------------------------------------------------


def tensors(total_bytes: int, count: int, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    """`count` float32 tensors of `total_bytes` together, on `device`."""
    g = torch.Generator().manual_seed(seed)
    per = total_bytes // 4 // count
    return [torch.rand(per, generator=g).to(device) for _ in range(count)]


def weights_state(total_bytes: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A model state_dict: 16 layers of float32 weights."""
    return {f"layers.{i}.weight": t for i, t in enumerate(tensors(total_bytes, 16, seed=1, device=device))}


def training_state(total_bytes: int, device: str = "cpu") -> dict[str, Any]:
    """Lightning's checkpoint dict shape: model (1/3) + Adam exp_avg and exp_avg_sq (2/3) + bookkeeping."""
    params = tensors(total_bytes // 3, 8, seed=2, device=device)
    optimizer_state = {
        i: {"step": torch.tensor(1000.0), "exp_avg": torch.rand_like(p), "exp_avg_sq": torch.rand_like(p)}
        for i, p in enumerate(params)
    }
    return {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"layers.{i}.weight": p for i, p in enumerate(params)},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        "callbacks": {},
        "optimizer_states": [
            {
                "state": optimizer_state,
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": list(range(len(params)))}],
            }
        ],
        "lr_schedulers": [{"step_size": 2, "gamma": 0.5, "last_epoch": 3}],
    }


def state_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


# -- breakdown --------------------------------------------------------------------------------


class Parts:
    """Exclusive time per part of a save, from wrappers around the functions the engine calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per open part: [children's time]

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self._stack.append([0.0])
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            children = self._stack.pop()[0]
            self.seconds[name] += elapsed - children
            if self._stack:
                self._stack[-1][0] += elapsed

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)

        return wrapped

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def instrument(parts: Parts) -> None:
    transaction_module.take_written = parts.wrap("hash", transaction_module.take_written)  # type: ignore[assignment]
    transaction_module.checksum_file = parts.wrap("hash", transaction_module.checksum_file)  # type: ignore[assignment]
    original_syncing = durable_module.syncing

    @contextmanager
    def syncing(path: str) -> Iterator[None]:
        with parts.part("fsync_wait"), original_syncing(path):
            yield

    durable_module.syncing = syncing  # type: ignore[assignment]
    original_fsync = store_module._fsync_path

    def fsync_path(path: str, directory: bool = False) -> None:
        if directory:  # directory fsyncs stay with the rename / manifest they make durable
            original_fsync(path, directory=True)
            return
        with parts.part("fsync"):
            original_fsync(path)

    store_module._fsync_path = fsync_path  # type: ignore[assignment]
    store_module.LocalStore.publish = parts.wrap("rename", store_module.LocalStore.publish)  # type: ignore[method-assign]
    # A full rewrite, or an incremental change (a journal line) where the directory has one.
    for name in ("commit", "commit_change"):
        if hasattr(CheckpointDirectory, name):
            setattr(CheckpointDirectory, name, parts.wrap("manifest", getattr(CheckpointDirectory, name)))


# -- variants ---------------------------------------------------------------------------------


PARTS = ("write", "hash", "fsync_wait", "fsync", "rename", "manifest", "other")


def median_parts(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(common.median([b.get(name, 0.0) for b in runs]), 6) for name in PARTS}


def file_size(folder: str) -> int:
    total = 0
    for base, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith((".pt", ".ckpt", ".bin")):
                total += os.path.getsize(os.path.join(base, name))
    return total


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=None, help="state size in MiB (default 1024, --quick 64)")
    common.add_device(p)
    args = p.parse_args()
    device, device_fields = common.device(args)
    size = (args.mib if args.mib is not None else (64 if args.quick else 1024)) * common.MiB
    repetitions = common.reps(args, default=7)

    common.note(f"building states of {size / common.MiB:.0f} MiB ...")
    objects = {"weights": weights_state(size, device), "training_state": training_state(size, device)}
    parts = Parts()
    instrument(parts)
    breakdowns: dict[str, list[dict[str, float]]] = {"weights": [], "training_state": [], "plain_weights": []}
    sizes: dict[str, int] = {}

    with common.workdir(args, "save") as root:
        counter = iter(range(10**9))

        def target() -> str:
            return common.fresh(os.path.join(root, f"run{next(counter)}"))

        def torch_save(kind: str, fsync: bool = False) -> Callable[[], float]:
            def run() -> float:
                folder = target()
                path = os.path.join(folder, "state" + EXTENSIONS[kind])
                started = time.perf_counter()
                torch.save(objects[kind], path)
                if fsync:
                    fd = os.open(path, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                elapsed = time.perf_counter() - started
                sizes[f"torch_save_{kind}"] = os.path.getsize(path)
                return elapsed

            return run

        def engine_save(kind: str, plain: bool = False) -> Callable[[], float]:
            def run() -> float:
                folder = target()
                policy = CheckpointPolicy(dirpath=folder, top_k=1, last=False, format=kind, verify=True)
                engine = Engine(policy, extensions=EXTENSIONS)
                engine.start()

                def write(item: SaveItem, path: str) -> None:
                    with parts.part("write"):
                        if plain:
                            torch.save(objects[item.format], path)
                        else:
                            save_torch(objects[item.format], path, checksum=True)

                parts.take()
                started = time.perf_counter()
                records = engine.save(0, 1000, {}, write)
                elapsed = time.perf_counter() - started
                measured = parts.take()
                engine.close()
                parts.take()  # close() folds the manifest journal: not part of the save
                measured["other"] = elapsed - sum(measured.values())
                breakdowns[("plain_" if plain else "") + kind].append(measured)
                sizes[f"engine_{'plain_' if plain else ''}{kind}"] = records[0].bytes
                return elapsed

            return run

        class Discard:
            def write(self, data: Any) -> int:
                return memoryview(data).nbytes

            def flush(self) -> None:
                pass

        def null_save(crc: bool) -> Callable[[], float]:
            def run() -> float:
                before = torch.serialization.get_crc32_options()
                torch.serialization.set_crc32_options(crc)
                try:
                    started = time.perf_counter()
                    torch.save(objects["weights"], Discard())
                    return time.perf_counter() - started
                finally:
                    torch.serialization.set_crc32_options(before)

            return run

        tensors_flat = [t.cpu() for t in objects["weights"].values()]  # the disk's limits: host bytes

        def raw(fsync: bool) -> Callable[[], float]:
            def run() -> float:
                path = os.path.join(target(), "raw.bin")
                started = time.perf_counter()
                with open(path, "wb", buffering=0) as f:
                    for t in tensors_flat:
                        f.write(memoryview(t.numpy()).cast("B"))
                    if fsync:
                        os.fsync(f.fileno())
                elapsed = time.perf_counter() - started
                sizes["raw_write"] = os.path.getsize(path)
                return elapsed

            return run

        def between() -> None:
            os.sync()  # the next variant starts with no dirty pages of this one
            for name in os.listdir(root):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            os.sync()
            time.sleep(0.5)  # let the disk settle after freeing a GiB (the next write is timed)

        variants = {
            "torch_save_weights": torch_save("weights"),
            "engine_weights": engine_save("weights"),
            "torch_save_training_state": torch_save("training_state"),
            "torch_save_fsync_weights": torch_save("weights", fsync=True),
            "torch_save_fsync_training_state": torch_save("training_state", fsync=True),
            "engine_training_state": engine_save("training_state"),
            "engine_plain_weights": engine_save("weights", plain=True),
            "torch_save_null_crc": null_save(crc=True),
            "torch_save_null_nocrc": null_save(crc=False),
            "raw_write": raw(fsync=False),
            "raw_write_fsync": raw(fsync=True),
        }
        common.note(f"{repetitions} repetitions of {len(variants)} variants, alternated ...")
        between()
        times = common.alternate(variants, repetitions, between=between)

    def throughput(name: str, size_key: str | None = None) -> float:
        return round(sizes[size_key or name] / common.median(times[name]) / common.MiB, 1)

    results: dict[str, Any] = {}
    for kind in ("weights", "training_state"):
        ours, base = times[f"engine_{kind}"], times[f"torch_save_{kind}"]
        parts_median = median_parts(breakdowns[kind])
        results[kind] = {
            "state_bytes": state_bytes(objects[kind]),
            "file_bytes": sizes[f"engine_{kind}"],
            "torch_save": common.summary(base),
            "engine": common.summary(ours),
            "ratio_engine_over_torch_save": common.ratio(ours, base),
            "paired_ratio": common.paired_ratio(ours, base),
            "target": "<= 1.10",
            "met": common.ratio(ours, base) <= 1.10,
            "MiB_per_s": {
                "torch_save": throughput(f"torch_save_{kind}"),
                "torch_save_fsync": throughput(f"torch_save_fsync_{kind}", f"torch_save_{kind}"),
                "engine": throughput(f"engine_{kind}"),
                "raw_write": throughput("raw_write"),
                "raw_write_fsync": throughput("raw_write_fsync", "raw_write"),
            },
            "torch_save_fsync": common.summary(times[f"torch_save_fsync_{kind}"]),
            "ratio_engine_over_torch_save_fsync": common.ratio(ours, times[f"torch_save_fsync_{kind}"]),
            "engine_over_raw_write_fsync": common.ratio(ours, times["raw_write_fsync"]),
            "engine_breakdown_median_s": parts_median,
        }
    plain = times["engine_plain_weights"]
    results["plain_writer_weights"] = {
        "engine": common.summary(plain),
        "ratio_engine_over_torch_save": common.ratio(plain, times["torch_save_weights"]),
        "paired_ratio": common.paired_ratio(plain, times["torch_save_weights"]),
        "ratio_over_engine_weights": common.ratio(plain, times["engine_weights"]),
        "engine_breakdown_median_s": median_parts(breakdowns["plain_weights"]),
    }
    results["torch_crc32_cost"] = {
        "torch_save_to_null_with_crc32": common.summary(times["torch_save_null_crc"]),
        "torch_save_to_null_without_crc32": common.summary(times["torch_save_null_nocrc"]),
        "crc32_s_per_GiB": round(
            (common.median(times["torch_save_null_crc"]) - common.median(times["torch_save_null_nocrc"]))
            * common.GiB
            / state_bytes(objects["weights"]),
            4,
        ),
    }
    results["raw_write"] = common.summary(times["raw_write"])
    results["raw_write_fsync"] = common.summary(times["raw_write_fsync"])
    common.emit(
        {
            "benchmark": "save_throughput",
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "state_MiB": size // common.MiB,
            "repetitions": repetitions,
            "torch": torch.__version__,
            **device_fields,
            "machine": common.machine(),
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
