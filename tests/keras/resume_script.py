"""A training script that test_resume.py runs, kills with SIGKILL after an epoch's save, and runs again.

    python resume_script.py DIR EPOCHS OUT.json [--kill-after-epoch K]

Dropout, Adam with a decaying learning rate and no shuffling: re-running the
same command must end with the weights of an uninterrupted run, bit for bit.
Writes the final weights (OUT.npz) and what the callback saw (OUT.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from checkpoint_hooks.keras import BestCheckpoint


class KillAfter(keras.callbacks.Callback):
    """SIGKILL right after epoch K's checkpoint was committed (it runs after BestCheckpoint)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == self.epoch:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("epochs", type=int)
    parser.add_argument("out")
    parser.add_argument("--kill-after-epoch", type=int, default=None)
    args = parser.parse_args()

    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    x = rng.random((48, 6), dtype=np.float32)
    y = (x.sum(axis=1, keepdims=True) + rng.normal(0, 0.1, (48, 1))).astype("float32")
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(1)]
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=4, decay_rate=0.8)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")

    callback = BestCheckpoint(monitor="val_loss", dirpath=args.dirpath, top_k=2, snapshots=2)
    seen: dict[str, Any] = {}

    def begin(logs: Any) -> None:
        seen["best_at_start"] = callback.best
        seen["iterations_at_start"] = int(model.optimizer.iterations.numpy())

    callbacks: list[keras.callbacks.Callback] = [callback, keras.callbacks.LambdaCallback(on_train_begin=begin)]
    if args.kill_after_epoch is not None:
        callbacks.append(KillAfter(args.kill_after_epoch))
    history = model.fit(
        x,
        y,
        validation_data=(x[:16], y[:16]),
        batch_size=12,
        epochs=args.epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    np.savez(args.out + ".npz", *model.get_weights())
    seen.update(
        epochs=history.epoch,
        val_loss=history.history.get("val_loss", []),
        best=callback.best,
        best_model_path=os.path.basename(callback.best_model_path),
        iterations=int(model.optimizer.iterations.numpy()),
        initial_epoch_after=model._initial_epoch,
    )
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
