"""Fit overhead, PyTorch Lightning: BestCheckpoint vs Lightning's ModelCheckpoint vs no checkpointing.

    python benchmarks/fit_overhead_lightning.py            # 20 epochs, 7 fits per variant
    python benchmarks/fit_overhead_lightning.py --quick    # 5 epochs, 2 fits per variant

A small MLP (32-256-256-1, about 75k parameters, Adam) on 2,048 random samples, 32 steps
per epoch, validation every epoch, a checkpoint callback that saves every epoch:

* none:   Trainer(enable_checkpointing=False)
* native: ModelCheckpoint(monitor="val_loss", save_top_k=3, save_last=True)
* ours:   BestCheckpoint(monitor="val_loss", top_k=3, snapshots every 5 epochs, last=True)
* ours_async: the same with async_save=True (the loop pays for a copy of the state; the rest runs in the background)

Each fit gets a fresh checkpoint folder; the three variants are interleaved fit by fit (a shuffled order each round) and
os.sync() runs untimed between fits. Reported: wall time of `trainer.fit` per variant,
ours/native (target <= 1.00), the time spent inside the checkpoint callback's hooks, and the
files each variant leaves.
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
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_hooks.lightning import BestCheckpoint


class MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
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
    args = p.parse_args()
    epochs = args.epochs if args.epochs is not None else (5 if args.quick else 20)
    repetitions = common.reps(args, default=7)
    quiet()
    torch.set_num_threads(1)  # two shared cores: keep the fits from fighting over threads
    train, val = loaders()
    callback_time: dict[str, list[float]] = {"native": [], "ours": [], "ours_async": []}
    files: dict[str, list[str]] = {}

    with common.workdir(args, "fit-lightning") as root:
        counter = iter(range(10**9))

        def fit(variant: str) -> float:
            folder = common.fresh(os.path.join(root, f"{variant}-{next(counter)}"))
            timer = common.HookTimer()
            callbacks: list[Any] = []
            if variant == "native":
                cb = ModelCheckpoint(dirpath=folder, monitor="val_loss", save_top_k=3, save_last=True)
                callbacks.append(timer.attach(cb, common.hook_names(cb, ("setup", "teardown", "state_dict"))))
            elif variant in ("ours", "ours_async"):
                cb = BestCheckpoint(
                    monitor="val_loss", dirpath=folder, top_k=3, snapshots={"every_n_epochs": 5}, last=True,
                    async_save=variant == "ours_async",
                )
                callbacks.append(timer.attach(cb, common.hook_names(cb, ("setup", "teardown", "state_dict"))))
            L.seed_everything(0, verbose=False)
            model = MLP()
            trainer = L.Trainer(
                max_epochs=epochs,
                callbacks=callbacks,
                enable_checkpointing=variant != "none",
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
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
        for values in callback_time.values():
            values.clear()
        variants = {name: (lambda name=name: fit(name)) for name in ("none", "native", "ours", "ours_async")}
        common.note(f"{repetitions} fits of {epochs} epochs per variant, alternated ...")
        times = common.alternate(variants, repetitions, between=os.sync)

    common.emit(
        common.fit_overhead_result(
            common.header("fit_overhead_lightning", lightning=L.__version__, torch=torch.__version__, epochs=epochs, repetitions=repetitions),
            times,
            callback_time,
            epochs,
            files,
        )
    )


if __name__ == "__main__":
    main()
