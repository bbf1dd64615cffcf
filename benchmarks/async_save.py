"""Async save: how long the training loop is blocked per checkpoint, against a synchronous save.

    python benchmarks/async_save.py            # a 1 GiB float32 state, 5 repetitions per variant
    python benchmarks/async_save.py --quick    # 64 MiB, 2 repetitions
    python benchmarks/async_save.py --device cuda [--clone-share 0]   # the state on the GPU

`--device cuda` puts the state on the GPU (the default where one is visible). The snapshot then
clones it on the device when it fits `--clone-share` of the free memory (default
`CLONE_SHARE_OF_FREE`; 0 never clones) and the worker copies the clones into pinned host
buffers; otherwise it copies into pinned host buffers asynchronously. On CUDA the blocked time
includes the wait for the work the snapshot queued on the training stream (a clone, or the copy
to host), not the worker's copies on their own stream.

Both variants go through the engine with checksums (verify=True), the way the Lightning adapter
saves `weights`, alternated save by save (os.sync() untimed after each):

* sync: `Engine.execute` with a writer calling `torch.save(state)`: write, hash, fsync, rename,
  sidecar, manifest commit, all on the training thread.
* async: `Engine.execute_async` (what `async_save=True` does): the training thread only copies the
  state into host buffers reused from one save to the next (the Lightning adapter's snapshot
  buffers); the save itself runs in the background worker. Timed: the `execute_async` call alone,
  i.e. what the loop waits for. The background part (`wait()`) is timed apart, untimed for the target.

Target: blocked time per checkpoint (async) <= 0.25 x the synchronous save time.
The first async save allocates its buffers (page faults); reuse makes the later ones cheaper:
both are reported.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import _common as common
import torch
from save_throughput import weights_state

from checkpoint_hooks.core.engine import Engine, SaveItem
from checkpoint_hooks.policy import CheckpointPolicy
from checkpoint_hooks.torch.io import CLONE_SHARE_OF_FREE, SnapshotBuffers

EXTENSIONS = {"training_state": ".ckpt", "weights": ".weights.pt"}


def main() -> None:
    p = common.parser(__doc__ or "")
    common.add_device(p)
    p.add_argument(
        "--clone-share", type=float, default=CLONE_SHARE_OF_FREE,
        help=f"share of a GPU's free memory a snapshot may clone into (default {CLONE_SHARE_OF_FREE}; 0: never clone)",
    )
    args = p.parse_args()
    device, device_fields = common.device(args)
    repetitions = common.reps(args, default=5, quick=2)
    size = (64 if args.quick else 1024) * common.MiB
    state = weights_state(size, device)
    buffers = SnapshotBuffers(clone_share=args.clone_share)
    background: list[float] = []
    first_blocked: list[float] = []
    with common.workdir(args, "async") as root:
        counter = iter(range(10**9))

        def engine(async_save: bool) -> Engine:
            folder = common.fresh(os.path.join(root, f"run-{next(counter)}"))
            policy = CheckpointPolicy(dirpath=folder, format="weights", top_k=1, last=False, async_save=async_save)
            e = Engine(policy, extensions=EXTENSIONS, default_format="weights")
            e.start()
            return e

        def write(item: SaveItem, path: str) -> None:
            torch.save(state, path)

        def write_copy(item: SaveItem, copy: Any, path: str) -> None:
            torch.save(buffers.ready(copy), path)

        def snapshot(item: SaveItem) -> Any:
            return buffers.copy(state)

        def sync() -> float:
            e = engine(False)
            plan = e.plan(0, 1, {})
            common.synchronize(device)
            started = time.perf_counter()
            e.execute(plan, write)
            elapsed = time.perf_counter() - started
            e.close()
            return elapsed

        # One engine for every async save, as in a fit: its buffers are kept from save to save
        # (the engine lets them go when it closes). top_k=1 prunes the save before.
        background_engine = engine(True)
        epochs = iter(range(10**9))

        def background_save() -> float:
            e = background_engine
            epoch = next(epochs)
            plan = e.plan(epoch, epoch + 1, {})
            common.synchronize(device)
            started = time.perf_counter()
            e.execute_async(plan, snapshot, write_copy, buffers.kept)
            common.synchronize(device)
            blocked = time.perf_counter() - started
            started = time.perf_counter()
            e.wait()
            background.append(time.perf_counter() - started)
            return blocked

        common.note("first async save (allocates the snapshot buffers) ...")
        first_blocked.append(background_save())
        background.clear()
        os.sync()
        common.note(f"{repetitions} saves of {size // common.MiB} MiB per variant, alternated ...")
        times = common.alternate({"sync": sync, "async_blocked": background_save}, repetitions, between=os.sync)
        background_engine.close()

    ratio = common.ratio(times["async_blocked"], times["sync"])
    common.emit(
        {
            "benchmark": "async_save",
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "state_MiB": size // common.MiB,
            "repetitions": repetitions,
            "torch": torch.__version__,
            **device_fields,
            "clone_share": args.clone_share if device == "cuda" else None,
            "machine": common.machine(),
            "sync_save_s": common.summary(times["sync"]),
            "async_blocked_s": common.summary(times["async_blocked"]),
            "async_first_blocked_s (fresh buffers)": round(first_blocked[0], 6),
            "async_background_s": common.summary(background),
            "ratio_blocked_over_sync": ratio,
            "target": "blocked / sync <= 0.25",
            "met": ratio <= 0.25,
        }
    )


if __name__ == "__main__":
    main()
