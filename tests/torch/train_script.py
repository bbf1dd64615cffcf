"""A hand-written PyTorch loop under `Checkpointer`: run it, kill it, run it again.

    python -m tests.torch.train_script --dir D --epochs 4 --out result.json [--kill-after-epoch K]
        [--sigterm-at-step S] [--raise-at-step S] [--policy JSON] [--no-with]

Dropout, a shuffling DataLoader and an LR scheduler make every random draw count: a resumed
run matches an uninterrupted one only if the model, optimizer, scheduler and every random
state come back.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal

import torch
from torch.utils.data import DataLoader, TensorDataset

from checkpoint_hooks.torch import Checkpointer


def digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values())).hexdigest()


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object, DataLoader, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(192, 8)
    y = (x[:, :4].sum(1, keepdim=True) > 0).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    return model, optimizer, scheduler, loader, x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--policy", default="{}", help="policy fields as JSON")
    parser.add_argument("--kill-after-epoch", type=int, default=None)
    parser.add_argument("--sigterm-at-step", type=int, default=None)
    parser.add_argument("--raise-at-step", type=int, default=None)
    parser.add_argument("--no-with", action="store_true", help="a plain for loop, without `with ckpt:`")
    args = parser.parse_args()

    model, optimizer, scheduler, loader, x, y = build()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    fields = {"dirpath": args.dir, "monitor": "val_loss", **json.loads(args.policy)}
    ckpt = Checkpointer(model, optimizer, scheduler=scheduler, **fields)
    trained: list[int] = []
    with ckpt if not args.no_with else contextlib.nullcontext(ckpt):
        for epoch in ckpt.epochs(args.epochs):
            trained.append(epoch)
            model.train()
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
                ckpt.step(loss=loss)
                if ckpt.global_step == args.sigterm_at_step:
                    os.kill(os.getpid(), signal.SIGTERM)
                if ckpt.global_step == args.raise_at_step:
                    raise RuntimeError("boom")
            scheduler.step()
            model.eval()
            with torch.no_grad():
                val_loss = loss_fn(model(x), y).item()
            ckpt.epoch_end(val_loss=val_loss)
            if epoch == args.kill_after_epoch:
                os.kill(os.getpid(), signal.SIGKILL)
    with open(args.out, "w") as f:
        json.dump({"digest": digest(model), "trained": trained, "best_model_path": ckpt.best_model_path,
                   "last_model_path": ckpt.last_model_path, "global_step": ckpt.global_step}, f)


if __name__ == "__main__":
    main()
