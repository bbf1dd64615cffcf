"""Keras quick start: the 3 best checkpoints by val_loss, a snapshot every 4 epochs, and automatic resume.

    python examples/keras_quickstart.py [--dir checkpoints/keras] [--epochs 12] [--crash-after-epoch 5]

Interrupt it however you like (Ctrl-C, kill -9, --crash-after-epoch) and run the same
command again: fit() continues at the next epoch with the weights, the optimizer state,
the dropout RNG, the best score and the kept checkpoints of the interrupted run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from checkpoint_hooks.keras import BestCheckpoint


class CrashAfter(keras.callbacks.Callback):
    """Kills the process right after an epoch's checkpoint, to show the resume."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch + 1 == self.epoch:
            print(f"-- crashing after epoch {epoch + 1}; run the same command again to continue", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="checkpoints/keras", help="checkpoint directory")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--crash-after-epoch", type=int, default=None, help="SIGKILL after this epoch (1-based)")
    parser.add_argument("--epoch-seconds", type=float, default=0.0, help="slow each epoch down (the demo kills the run from outside mid-run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # verbose=1 logs on "checkpoint_hooks"

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((512, 8), dtype=np.float32)
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(512, 1))).astype("float32")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.1), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])

    checkpoint = BestCheckpoint(
        monitor="val_loss",
        dirpath=args.dir,
        filename="epoch={epoch:02d}-val_loss={val_loss:.4f}",
        top_k=3,
        snapshots=4,  # every 4th epoch, kept outside the top-3 rotation
        verbose=1,
    )
    callbacks: list[keras.callbacks.Callback] = [checkpoint]
    if args.crash_after_epoch:
        callbacks.append(CrashAfter(args.crash_after_epoch))
    if args.epoch_seconds:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: time.sleep(args.epoch_seconds)))
    # shuffle=False makes a resumed run repeat the uninterrupted one exactly.
    model.fit(
        x[:384],
        y[:384],
        validation_data=(x[384:], y[384:]),
        epochs=args.epochs,
        batch_size=32,
        shuffle=False,
        verbose=2,
        callbacks=callbacks,
    )

    print(f"best: {checkpoint.best_model_path} (val_loss={checkpoint.best_model_score:.4f})")
    print(f"last: {checkpoint.last_model_path}")
    best = keras.models.load_model(checkpoint.best_model_path)
    print(f"reloaded best model: val_loss={best.evaluate(x[384:], y[384:], verbose=0)[0]:.4f}")


if __name__ == "__main__":
    main()
