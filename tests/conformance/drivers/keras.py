"""Conformance driver for `checkpoint_hooks.keras.BestCheckpoint` (command line: see `common`).

A 4-16-1 MLP with dropout and Adam on an exponentially decaying learning rate, as in
tests/keras/resume_script.py. The data is not shuffled: Keras does not restore its shuffling
order on resume (README, "Resume" under Keras), so a shuffled run could not end bit-identical.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from tests.conformance.drivers import common

common.setup_process()

import keras  # noqa: E402

from checkpoint_hooks.keras import BestCheckpoint  # noqa: E402

SHUFFLE = False


def _step(model: Any) -> int:
    return int(model.optimizer.iterations.numpy())


class RaiseAt(keras.layers.Layer):
    """Raises in the training step that would complete step `at + 1` (the model then runs eagerly).

    `step` reads the optimizer's counter; a function, because Keras would track a model attribute.
    """

    def __init__(self, at: int, step: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at
        self.step = step

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if training and self.step() == self.at:
            raise RuntimeError("boom")
        return inputs

    def get_config(self) -> dict[str, Any]:
        # A .keras save stores the config; resuming loads weights into this model, never from the config.
        return {**super().get_config(), "at": self.at}


class SigtermAt(keras.callbacks.Callback):
    """Sends SIGTERM at the end of the batch that completes step S; placed before BestCheckpoint,
    which then acts on it at the same batch end."""

    def __init__(self, step: int | None) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if _step(self.model) == self.step:
            common.die(signal.SIGTERM)


class Probe(keras.callbacks.Callback):
    """Counts batches, records val_loss and kills where asked; placed after BestCheckpoint."""

    def __init__(self, args: common.Args, progress: common.Progress) -> None:
        super().__init__()
        self.args = args
        self.progress = progress
        self.epoch = -1

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if _step(self.model) == self.args.kill_at_step:
            common.die(signal.SIGKILL)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.progress.batch_done(self.epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs and "val_loss" in logs:
            self.progress.val_loss[epoch] = float(logs["val_loss"])
        if epoch == self.args.kill_after_epoch:
            common.die(signal.SIGKILL)  # BestCheckpoint, before this callback, committed epoch K


def main(argv: list[str]) -> int:
    args = common.parse_args(argv)
    keras.utils.set_random_seed(common.SEED)
    x, y = common.train_set()
    xv, yv = common.validation_set()
    layers: list[Any] = [keras.Input((common.FEATURES,))]
    built: list[Any] = []
    raiser = RaiseAt(args.raise_at_step, lambda: _step(built[0])) if args.raise_at_step is not None else None
    if raiser is not None:
        layers.append(raiser)
    layers += [keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=common.STEPS_PER_EPOCH, decay_rate=0.7)
    # A Python exception inside a step needs an eager step; only the run that raises pays for it.
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse", run_eagerly=raiser is not None)
    built.append(model)
    progress = common.Progress()
    checkpoint = BestCheckpoint(**args.checkpoint_kwargs())
    callbacks = [SigtermAt(args.sigterm_at_step), checkpoint, Probe(args, progress)]
    model.fit(x, y, validation_data=(xv, yv), batch_size=common.BATCH, epochs=args.epochs, shuffle=SHUFFLE,
              verbose=0, callbacks=callbacks)
    weights = [(w.path, w.numpy()) for w in model.weights]
    progress.write(args, digest=common.digest(weights), best_model_path=checkpoint.best_model_path,
                   global_step=_step(model), shuffled=SHUFFLE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
