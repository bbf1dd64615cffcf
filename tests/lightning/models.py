"""Tiny models and data for Lightning tests; shared by the in-process tests and the training script."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset


def data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


def loader(shuffle: bool = False, n: int = 32, batch_size: int = 8) -> DataLoader:
    return DataLoader(data(n), batch_size=batch_size, shuffle=shuffle)


def _module_class(L, suffix: str) -> type:
    """A LightningModule class for the namespace `L`, importable by name (so format='model' can pickle it)."""

    class Tiny(L.LightningModule):
        def __init__(self, dropout: float = 0.0, scripted: Sequence[float] | None = None, scheduler: bool = False) -> None:
            super().__init__()
            self.scripted = list(scripted) if scripted is not None else None
            self.use_scheduler = scheduler
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))
            if self.scripted is not None and not self.trainer.sanity_checking:
                value = self.scripted[self.current_epoch]
                self.log("val_metric", float(value) if not math.isnan(value) else float("nan"))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
            if not self.use_scheduler:
                return optimizer
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    Tiny.__name__ = Tiny.__qualname__ = f"Tiny{suffix}"
    return Tiny


import lightning.pytorch as _lp  # noqa: E402
import pytorch_lightning as _pl  # noqa: E402

TinyLP = _module_class(_lp, "LP")
TinyPL = _module_class(_pl, "PL")


def make_module(L, dropout: float = 0.0, scripted: Sequence[float] | None = None, scheduler: bool = False):
    """A tiny LightningModule of namespace `L`; `scripted` makes validation log those values as `val_metric`."""
    cls = TinyLP if L is _lp else TinyPL
    return cls(dropout=dropout, scripted=scripted, scheduler=scheduler)


def trainer(L, callbacks, max_epochs: int, **kw):
    kw.setdefault("logger", False)
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kw,
    )
