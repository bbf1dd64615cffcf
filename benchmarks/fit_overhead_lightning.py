"""Fit overhead, PyTorch Lightning: BestCheckpoint vs Lightning's ModelCheckpoint (sync and async) vs none.

    python benchmarks/fit_overhead_lightning.py                 # 20 epochs, 7 fits per variant
    python benchmarks/fit_overhead_lightning.py --quick         # 5 epochs, 2 fits per variant
    python benchmarks/fit_overhead_lightning.py --device cuda --hidden 4096   # on the GPU, a larger state

An MLP (32-H-H-1 with H = --hidden, default 256: about 75k parameters, Adam) on 2,048 random
samples, 32 steps per epoch, validation every epoch, a checkpoint callback that saves every epoch:

* none:   Trainer(enable_checkpointing=False)
* native: ModelCheckpoint(monitor="val_loss", save_top_k=3, save_last=True)
* native_async: the same with Trainer(plugins=[AsyncCheckpointIO()]) (Lightning clones the state's
  tensors on their device on the training thread; its thread writes them)
* ours:   BestCheckpoint(monitor="val_loss", top_k=3, snapshots every 5 epochs, last=True)
* ours_async: the same with async_save=True (the loop pays for a copy of the state; the rest runs in the background)

`--device` picks the Trainer's accelerator (cpu, or cuda: one GPU; default cuda where one is visible).
Each fit gets a fresh checkpoint folder; the variants are interleaved fit by fit (a shuffled order each round) and
os.sync() runs untimed between fits. Reported: wall time of `trainer.fit` per variant,
ours/native (target <= 1.00), the time spent inside the checkpoint callback's hooks, per
variant and per save point (every variant saves at each epoch end), with its ratios between
variants, and the files each variant leaves.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import _common as common
import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_hooks.lightning import BestCheckpoint

VARIANTS = ("none", "native", "native_async", "ours", "ours_async")


class MLP(L.LightningModule):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2560, 32, generator=g)
    y = torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(2560, 1, generator=g)
    train = DataLoader(TensorDataset(x[:2048], y[:2048]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[2048:], y[2048:]), batch_size=128)
    return train, val


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs per fit (default 20, --quick 5)")
    p.add_argument("--hidden", type=int, default=256, help="width of the MLP's hidden layers (default 256)")
    common.add_device(p)
    args = p.parse_args()
    device, device_fields = common.device(args)
    epochs = args.epochs if args.epochs is not None else (5 if args.quick else 20)
    repetitions = common.reps(args, default=7)
    quiet()
    torch.set_num_threads(1)  # two shared cores: keep the fits from fighting over threads
    train, val = loaders()
    callback_time: dict[str, list[float]] = {name: [] for name in VARIANTS if name != "none"}
    files: dict[str, list[str]] = {}

    with common.workdir(args, "fit-lightning") as root:
        counter = iter(range(10**9))

        def fit(variant: str) -> float:
            folder = common.fresh(os.path.join(root, f"{variant}-{next(counter)}"))
            timer = common.HookTimer()
            callbacks: list[Any] = []
            if variant in ("native", "native_async"):
                cb = ModelCheckpoint(dirpath=folder, monitor="val_loss", save_top_k=3, save_last=True)
                callbacks.append(timer.attach(cb, common.hook_names(cb, ("setup", "teardown", "state_dict"))))
            elif variant in ("ours", "ours_async"):
                cb = BestCheckpoint(
                    monitor="val_loss", dirpath=folder, top_k=3, snapshots={"every_n_epochs": 5}, last=True,
                    async_save=variant == "ours_async",
                )
                callbacks.append(timer.attach(cb, common.hook_names(cb, ("setup", "teardown", "state_dict"))))
            L.seed_everything(0, verbose=False)
            model = MLP(args.hidden)
            trainer = L.Trainer(
                max_epochs=epochs,
                callbacks=callbacks,
                plugins=[AsyncCheckpointIO()] if variant == "native_async" else None,
                enable_checkpointing=variant != "none",
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="gpu" if device == "cuda" else "cpu",
                devices=1,
                default_root_dir=folder,
            )
            started = time.perf_counter()
            trainer.fit(model, train, val)
            elapsed = time.perf_counter() - started
            if variant in callback_time:
                callback_time[variant].append(timer.seconds)
            files[variant] = sorted(os.listdir(folder))
            return elapsed

        common.note("warm-up fit (imports, first-call costs; not counted) ...")
        fit("none")
        fit("ours")
        fit("native")
        fit("ours_async")
        fit("native_async")
        for values in callback_time.values():
            values.clear()
        variants = {name: (lambda name=name: fit(name)) for name in VARIANTS}
        common.note(f"{repetitions} fits of {epochs} epochs per variant, alternated ...")
        times = common.alternate(variants, repetitions, between=os.sync)

    header = common.header(
        "fit_overhead_lightning", lightning=L.__version__, torch=torch.__version__, epochs=epochs,
        repetitions=repetitions, hidden=args.hidden, parameters=sum(p.numel() for p in MLP(args.hidden).parameters()),
        **device_fields,
    )
    result = common.fit_overhead_result(header, times, callback_time, epochs, files)
    result["ratio_native_async_over_native"] = common.ratio(times["native_async"], times["native"])
    result["ratio_ours_async_over_native_async"] = common.ratio(times["ours_async"], times["native_async"])
    result.update(hooks_per_save(callback_time, saves=epochs))
    common.emit(result)


def hooks_per_save(callback_time: dict[str, list[float]], saves: int) -> dict[str, Any]:
    """The training loop's time inside each checkpoint callback's hooks per save point, and its ratios."""
    per_save = {name: common.median(values) / saves for name, values in callback_time.items()}
    pairs = [("ours", "native"), ("ours_async", "native"), ("ours_async", "native_async"), ("native_async", "native")]
    return {
        "hooks_ms_per_save": {name: round(1000 * seconds, 3) for name, seconds in per_save.items()},
        "ratio_hooks_per_save": {f"{a}_over_{b}": round(per_save[a] / per_save[b], 4) for a, b in pairs},
    }


if __name__ == "__main__":
    main()
