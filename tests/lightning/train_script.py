"""A user's training script: run it, kill it, run it again. Used by the resume and DDP tests.

    python -m tests.lightning.train_script --dir D --epochs 4 --out final.pt [--kill-at-epoch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at-epoch", type=int, default=None, help="SIGKILL when this epoch starts")
    parser.add_argument("--namespace", default="lightning.pytorch")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--signal-ready-at-step", type=int, default=None,
                        help="from this global step on: write <out>.ready and slow down (so a test can send SIGTERM)")
    args = parser.parse_args()

    L = __import__(args.namespace, fromlist=["Trainer"])
    from checkpoint_hooks.lightning import BestCheckpoint
    from tests.lightning.models import loader, make_module

    L.seed_everything(7, verbose=False)

    class Killer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == args.kill_at_epoch:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_end(self, trainer, pl_module, *rest):
            if args.signal_ready_at_step is not None and trainer.global_step >= args.signal_ready_at_step:
                with open(args.out + ".ready", "w") as f:
                    f.write(str(trainer.global_step))
                time.sleep(0.5)

    checkpoint = BestCheckpoint(monitor="val_loss", dirpath=args.dir, top_k=2, snapshots={"every_n_epochs": 2},
                                async_save=args.async_save)
    trainer = L.Trainer(
        max_epochs=args.epochs, callbacks=[Killer(), checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=args.devices, strategy=args.strategy,
    )
    model = make_module(L, dropout=0.3, scheduler=True)
    trainer.fit(model, loader(shuffle=True), loader())
    if trainer.is_global_zero:
        torch.save({"state_dict": model.state_dict(), "global_step": trainer.global_step,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"]}, args.out)
        print(json.dumps({"global_step": trainer.global_step, "best": checkpoint.best_model_path}))


if __name__ == "__main__":
    main()
