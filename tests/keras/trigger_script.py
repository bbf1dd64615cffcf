"""A training script that test_triggers.py kills (SIGKILL after a mid-epoch save, or SIGTERM) and runs again.

    python trigger_script.py DIR OUT.json [--epochs N] [--every-n-steps N] [--kill-at-step S]
                             [--ready-at-step S] [--no-save-on-preemption]

32 samples in batches of 8 (4 steps an epoch), no shuffling. --kill-at-step S
sends SIGKILL to this process right after the checkpoint callback's batch end at
optimizer step S. --ready-at-step S writes OUT.json.ready at step S and then
waits (up to a minute) for a SIGTERM from the test; the checkpoint callback comes
after the waiting one, so it acts on the signal at that same step. When fit()
returns, OUT.json says what the run saw.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from checkpoint_hooks.keras import BestCheckpoint


class AtStep(keras.callbacks.Callback):
    """Runs `action` at the batch end where the optimizer reaches `step`."""

    def __init__(self, step: int, action: Any) -> None:
        super().__init__()
        self.step = step
        self.action = action

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            self.action()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every-n-steps", type=int, default=None)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--ready-at-step", type=int, default=None)
    parser.add_argument("--no-save-on-preemption", action="store_true")
    args = parser.parse_args()

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.random((32, 4), dtype=np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype=np.float32)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")

    checkpoint = BestCheckpoint(
        monitor="loss",
        dirpath=args.dirpath,
        top_k=1,
        every_n_steps=args.every_n_steps,
        save_on_preemption=not args.no_save_on_preemption,
    )
    seen: dict[str, Any] = {}

    def begin(logs: Any) -> None:
        seen["iterations_at_start"] = int(model.optimizer.iterations.numpy())

    def wait_for_sigterm() -> None:
        with open(args.out + ".ready", "w", encoding="utf-8"):
            pass
        deadline = time.monotonic() + 60
        while not checkpoint.preempted and time.monotonic() < deadline:
            time.sleep(0.01)

    def kill() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    callbacks: list[keras.callbacks.Callback] = []
    if args.ready_at_step is not None:
        callbacks.append(AtStep(args.ready_at_step, wait_for_sigterm))
    callbacks += [checkpoint, keras.callbacks.LambdaCallback(on_train_begin=begin)]
    if args.kill_at_step is not None:
        callbacks.append(AtStep(args.kill_at_step, kill))
    history = model.fit(x, y, batch_size=8, epochs=args.epochs, shuffle=False, verbose=0, callbacks=callbacks)
    seen.update(
        epochs=history.epoch,
        iterations=int(model.optimizer.iterations.numpy()),
        initial_epoch_after=model._initial_epoch,
    )
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
