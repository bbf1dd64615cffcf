"""Conformance driver for `checkpoint_hooks.torch.Checkpointer` (command line: see `common`).

A hand-written loop over the same data as the other drivers: a 4-8-1 network with dropout,
Adam, a per-epoch StepLR and a shuffling DataLoader, inside `with ckpt:` so that an exception
escaping the loop saves a training state.
"""

from __future__ import annotations

import signal
import sys

from tests.conformance.drivers import common

common.setup_process()

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from checkpoint_hooks.torch import Checkpointer  # noqa: E402


def main(argv: list[str]) -> int:
    args = common.parse_args(argv)
    torch.manual_seed(common.SEED)
    x, y = common.train_set()
    xv, yv = (torch.from_numpy(a) for a in common.validation_set())
    train = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=common.BATCH, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(common.FEATURES, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    progress = common.Progress()
    with Checkpointer(model, optimizer, scheduler=scheduler, **args.checkpoint_kwargs()) as ckpt:
        for epoch in ckpt.epochs(args.epochs):
            if args.kill_after_epoch is not None and epoch == args.kill_after_epoch + 1:
                common.die(signal.SIGKILL)
            model.train()
            for xb, yb in train:
                if ckpt.global_step == args.kill_at_step:
                    common.die(signal.SIGKILL)
                if ckpt.global_step == args.raise_at_step:
                    raise RuntimeError("boom")
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(xb), yb).backward()
                optimizer.step()
                progress.batch_done(epoch)
                if ckpt.global_step + 1 == args.sigterm_at_step:
                    common.die(signal.SIGTERM)  # the handler marks it; the step() that completes step S acts
                ckpt.step()
            scheduler.step()
            model.eval()
            with torch.no_grad():
                val_loss = torch.nn.functional.mse_loss(model(xv), yv).item()
            progress.val_loss[epoch] = val_loss
            ckpt.epoch_end(val_loss=val_loss)
    weights = sorted((k, v.detach().numpy()) for k, v in model.state_dict().items())
    progress.write(args, digest=common.digest(weights), best_model_path=ckpt.best_model_path,
                   global_step=ckpt.global_step, shuffled=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
