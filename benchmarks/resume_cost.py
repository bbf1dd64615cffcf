"""Resume cost, PyTorch Lightning: fit() start to the first training step when resuming a 1 GiB training state.

    python benchmarks/resume_cost.py            # 1 GiB checkpoint, 7 repetitions per variant and cache state
    python benchmarks/resume_cost.py --quick    # 64 MiB, 2 repetitions

One checkpoint is written first by a one-epoch fit with BestCheckpoint: a LightningModule with
1/3 of the size in float32 parameters and Adam (exp_avg + exp_avg_sq: the other 2/3), so the
`.ckpt` is the given size. Then, alternately, a new Trainer (max_epochs=2) resumes from it:

* ours:   trainer.fit(model) with BestCheckpoint(dirpath=<that directory>): automatic resume
          (read the manifest, load the newest training_state while a second thread verifies its
          xxh3-128 checksum; training starts once both are done).
* native: trainer.fit(model, ckpt_path=<the same file>) with Lightning's ModelCheckpoint.

The time runs from the call of `trainer.fit` to the entry of the first `training_step`
(where the benchmark stops the fit). Both resume the same file with the same model, already
built. Measured twice: warm (the file in the page cache, e.g. a restart right after a crash)
and cold (the file evicted from the page cache with posix_fadvise(DONTNEED) before each
run, as after a reboot). Target: ours/native <= 1.10. Parts: the time Lightning's
`_restore_modules_and_callbacks` takes (the load) in both variants, and ours's checksum
verification (`CheckpointDirectory.verify_record`), which runs beside the load.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import warnings
from typing import Any

import _common as common
import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.lightning import BestCheckpoint
from checkpoint_hooks.policy import CheckpointPolicy

# The benchmark ends each fit by raising at the first step: that is no preemption to save on.
NO_PREEMPTION_SAVE = {"save_on_preemption": False} if "save_on_preemption" in CheckpointPolicy.model_fields else {}


class Stop(Exception):
    """Raised in the first training_step: the benchmark has what it measures."""


class Big(L.LightningModule):
    def __init__(self, param_bytes: int) -> None:
        super().__init__()
        per = param_bytes // 4 // 4
        self.blocks = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(per)) for _ in range(4)])
        self.head = torch.nn.Linear(8, 1)
        self.first_step_at: float | None = None
        self.stop_at_first_step = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        if self.stop_at_first_step:
            raise Stop
        x, y = batch
        # touch every parameter a little so that Adam keeps state for all of them
        extra = sum(p[:8].sum() for p in self.blocks)
        return torch.nn.functional.mse_loss(self.head(x), y) + 1e-6 * extra

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.head(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(x, y), batch_size=32)


def trainer(callback: Any, folder: str, epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        limit_train_batches=1,
        limit_val_batches=1,
        default_root_dir=folder,
    )


def evict(path: str) -> None:
    """Drop one file's pages from the page cache (its pages are clean: it was fsynced when saved)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=None, help="checkpoint size in MiB (default 1024, --quick 64)")
    args = p.parse_args()
    size = (args.mib if args.mib is not None else (64 if args.quick else 1024)) * common.MiB
    repetitions = common.reps(args, default=7)
    quiet()
    train, val = loaders()
    verify_s: dict[str, list[float]] = {"warm": [], "cold": []}
    original_verify = CheckpointDirectory.verify_record
    verify_clock = [0.0]

    def timed_verify(self: CheckpointDirectory, *a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return original_verify(self, *a, **kw)
        finally:
            verify_clock[0] += time.perf_counter() - started

    CheckpointDirectory.verify_record = timed_verify  # type: ignore[method-assign]
    load_s: dict[str, list[float]] = {}
    original_restore = _CheckpointConnector._restore_modules_and_callbacks
    load_clock = [0.0]

    def timed_restore(self: _CheckpointConnector, *a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return original_restore(self, *a, **kw)
        finally:
            load_clock[0] += time.perf_counter() - started

    _CheckpointConnector._restore_modules_and_callbacks = timed_restore  # type: ignore[method-assign]

    with common.workdir(args, "resume") as root:
        ours_dir = os.path.join(root, "ours")
        common.note(f"writing a {size / common.MiB:.0f} MiB training state with a one-epoch fit ...")
        L.seed_everything(0, verbose=False)
        model = Big(size // 3)
        first = BestCheckpoint(monitor="val_loss", dirpath=ours_dir, top_k=1, last=True, **NO_PREEMPTION_SAVE)
        trainer(first, root, 1).fit(model, train, val)
        ckpt = first.last_model_path
        ckpt_bytes = os.path.getsize(ckpt)
        common.note(f"checkpoint: {ckpt} ({ckpt_bytes / common.MiB:.0f} MiB)")
        del model, first
        counter = iter(range(10**9))

        def resume(variant: str, cold: bool) -> float:
            L.seed_everything(0, verbose=False)
            model = Big(size // 3)
            model.stop_at_first_step = True
            if variant == "ours":
                callback: Any = BestCheckpoint(monitor="val_loss", dirpath=ours_dir, top_k=1, last=True, **NO_PREEMPTION_SAVE)
                kwargs: dict[str, Any] = {}
            else:
                callback = ModelCheckpoint(
                    dirpath=os.path.join(root, f"native-{next(counter)}"), monitor="val_loss", save_top_k=1, save_last=True
                )
                kwargs = {"ckpt_path": ckpt}
            t = trainer(callback, root, 2)
            if cold:
                evict(ckpt)
            verify_clock[0] = load_clock[0] = 0.0
            started = time.perf_counter()
            try:
                t.fit(model, train, val, **kwargs)
            except Stop:
                pass
            if model.first_step_at is None:
                raise RuntimeError(f"{variant}: the fit ended without a training step")
            if t.current_epoch != 1:
                raise RuntimeError(f"{variant}: resumed at epoch {t.current_epoch}, expected 1")
            cache = "cold" if cold else "warm"
            if variant == "ours":
                verify_s[cache].append(verify_clock[0])
            load_s.setdefault(f"{variant}_{cache}", []).append(load_clock[0])
            return model.first_step_at - started

        results: dict[str, Any] = {}
        for cache in ("warm", "cold"):
            cold = cache == "cold"
            common.note(f"{repetitions} {cache} resumes per variant, alternated ...")
            if not cold:
                resume("ours", cold=False)  # warm the page cache and first-call costs; not counted
                resume("native", cold=False)
            times = common.alternate(
                {"native": lambda cold=cold: resume("native", cold), "ours": lambda cold=cold: resume("ours", cold)},
                repetitions,
                between=gc.collect,  # the previous fit's model and checkpoint freed before the next one
            )
            ratio = common.ratio(times["ours"], times["native"])
            results[cache] = {
                "to_first_step_s": {name: common.summary(values) for name, values in times.items()},
                "ratio_ours_over_native": ratio,
                "paired_ratio_ours_over_native": common.paired_ratio(times["ours"], times["native"]),
                "ours_verify_checksum_median_s": round(common.median(verify_s[cache]), 4),
                "load_median_s": {
                    name: round(common.median(load_s[f"{name}_{cache}"][-repetitions:]), 4) for name in ("native", "ours")
                },
                "target": "<= 1.10",
                "met": ratio <= 1.10,
            }

    common.emit(
        {
            "benchmark": "resume_cost",
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "lightning": L.__version__,
            "torch": torch.__version__,
            "checkpoint_bytes": ckpt_bytes,
            "repetitions": repetitions,
            "machine": common.machine(),
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
