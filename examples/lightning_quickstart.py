"""BestCheckpoint in a PyTorch Lightning fit. Run it twice: the second run continues where the first ended.

    python examples/lightning_quickstart.py --epochs 3     # trains epochs 0-2
    python examples/lightning_quickstart.py --epochs 6     # continues with epochs 3-5
"""

from __future__ import annotations

import argparse
import logging
import time

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import LambdaCallback
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_hooks.lightning import BestCheckpoint


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    return (DataLoader(TensorDataset(x[:400], y[:400]), batch_size=32, shuffle=True),
            DataLoader(TensorDataset(x[400:], y[400:]), batch_size=64))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--dir", default="checkpoints/lightning")
    parser.add_argument("--epoch-seconds", type=float, default=0.0, help="slow each epoch down (the demo kills the run from outside mid-run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    L.seed_everything(0, verbose=False)
    checkpoint = BestCheckpoint(
        monitor="val_loss", dirpath=args.dir, top_k=2, snapshots={"every_n_epochs": 2}, verbose=True
    )
    callbacks: list[L.Callback] = [checkpoint]
    if args.epoch_seconds:
        callbacks.append(LambdaCallback(on_train_epoch_end=lambda trainer, module: time.sleep(args.epoch_seconds)))
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    train, val = loaders()
    trainer.fit(Regressor(), train, val)
    logging.info("best: %s (val_loss=%.4f)", checkpoint.best_model_path, checkpoint.best_model_score)
    logging.info("last: %s", checkpoint.last_model_path)


if __name__ == "__main__":
    main()
