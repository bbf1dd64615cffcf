"""Conformance driver for `checkpoint_hooks.paddle.BestCheckpoint` (command line: see `common`).

The network and optimizer of tests/paddle/toy.py (4-8-1 with tanh and dropout, Adam with a
StepDecay schedule that hapi's LRScheduler callback steps every batch); shuffled data.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from tests.conformance.drivers import common

common.setup_process()

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from checkpoint_hooks.paddle import BestCheckpoint  # noqa: E402
from tests.paddle.toy import Recorder, regression_model  # noqa: E402


class Arrays(paddle.io.Dataset):  # type: ignore[type-arg]
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


class Probe(paddle.callbacks.Callback):
    """Counts batches and kills, signals or lets the network raise where asked; placed after BestCheckpoint.

    The global step is the schedule's own counter: restored on resume, stepped by hapi's
    LRScheduler callback (the last one) at every batch end.
    """

    def __init__(self, args: common.Args, progress: common.Progress, model: Any) -> None:
        super().__init__()
        self.args = args
        self.progress = progress
        self.schedule = model._optimizer._learning_rate
        self.epoch = -1
        self.step_at_begin = -1
        if args.raise_at_step is not None:
            model.network.register_forward_pre_hook(self._raise_in_training_step)

    def _raise_in_training_step(self, layer: Any, inputs: Any) -> None:
        if layer.training and self.schedule.last_epoch == self.args.raise_at_step:
            raise RuntimeError("boom")

    def on_epoch_begin(self, epoch: int | None = None, logs: Any = None) -> None:
        self.epoch = int(epoch or 0)
        if self.args.kill_after_epoch is not None and self.epoch == self.args.kill_after_epoch + 1:
            common.die(signal.SIGKILL)  # BestCheckpoint saved epoch K in its on_epoch_begin, just before

    def on_train_batch_begin(self, step: int, logs: Any = None) -> None:
        self.step_at_begin = self.schedule.last_epoch
        if self.step_at_begin == self.args.kill_at_step:
            common.die(signal.SIGKILL)  # a step save at S happened between the batches, before this hook

    def on_train_batch_end(self, step: int, logs: Any = None) -> None:
        self.progress.batch_done(self.epoch)
        if self.step_at_begin + 1 == self.args.sigterm_at_step:
            common.die(signal.SIGTERM)  # BestCheckpoint saves before the next batch and re-raises it


def main(argv: list[str]) -> int:
    args = common.parse_args(argv)
    model = regression_model(common.SEED, dropout=True)
    x, y = common.train_set()
    xv, yv = common.validation_set()
    progress = common.Progress()
    recorder = Recorder()  # the epoch's mean evaluation loss, as BestCheckpoint computes val_loss
    checkpoint = BestCheckpoint(**args.checkpoint_kwargs())
    probe = Probe(args, progress, model)
    model.fit(Arrays(x, y), Arrays(xv, yv), batch_size=common.BATCH, epochs=args.epochs, verbose=0, shuffle=True,
              callbacks=[checkpoint, recorder, probe])
    progress.val_loss = {e: v for e, v in recorder.val_loss.items() if e in progress.batches}
    weights = sorted((k, np.array(v.numpy())) for k, v in model.network.state_dict().items())
    progress.write(args, digest=common.digest(weights), best_model_path=checkpoint.best_model_path,
                   global_step=int(probe.schedule.last_epoch), shuffled=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
