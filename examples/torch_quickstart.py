"""Checkpointer in a hand-written PyTorch loop. Run it twice: the second run continues where the first ended.

    python examples/torch_quickstart.py --epochs 3     # trains epochs 0-2
    python examples/torch_quickstart.py --epochs 6     # continues with epochs 3-5
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_hooks.torch import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--dir", default="checkpoints/torch")
    parser.add_argument("--epoch-seconds", type=float, default=0.0, help="slow each epoch down (the demo kills it mid-run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    train = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

    with Checkpointer(model, optimizer, scheduler=scheduler, monitor="val_loss", dirpath=args.dir, top_k=2,
                      snapshots={"every_n_epochs": 2}, verbose=True) as ckpt:
        for _epoch in ckpt.epochs(args.epochs):
            model.train()
            for xb, yb in train:
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(xb), yb).backward()
                optimizer.step()
                ckpt.step()
            scheduler.step()
            model.eval()
            with torch.no_grad():
                val_loss = torch.nn.functional.mse_loss(model(x[400:]), y[400:]).item()
            time.sleep(args.epoch_seconds)
            ckpt.epoch_end(val_loss=val_loss)
    logging.info("best: %s (val_loss=%.4f)", ckpt.best_model_path, ckpt.best_model_score or float("nan"))
    logging.info("last: %s", ckpt.last_model_path)


if __name__ == "__main__":
    main()
