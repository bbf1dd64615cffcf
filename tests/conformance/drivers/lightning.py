"""Conformance driver for `checkpoint_hooks.lightning.BestCheckpoint` (command line: see `common`).

The model and trainer settings are those of tests/lightning (Tiny: 4-8-1 with dropout, Adam,
StepLR per epoch); the data is shuffled every epoch.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from tests.conformance.drivers import common

common.setup_process()

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from checkpoint_hooks.lightning import BestCheckpoint  # noqa: E402
from tests.lightning.models import make_module, trainer  # noqa: E402


class Probe(L.Callback):
    """Counts batches, records val_loss, and kills, signals or lets the model raise where asked.

    Lightning runs checkpoint callbacks after the others at every hook, so the kills happen at the
    start of the next epoch or batch, once BestCheckpoint committed what it saves at the one before.
    """

    def __init__(self, args: common.Args, progress: common.Progress) -> None:
        super().__init__()
        self.args = args
        self.progress = progress

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.args.raise_at_step is not None:
            pl_module.register_forward_pre_hook(self._raise_in_training_step)

    def _raise_in_training_step(self, module: Any, inputs: Any) -> None:
        if module.training and module.trainer.global_step == self.args.raise_at_step:
            raise RuntimeError("boom")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.args.kill_after_epoch is not None and trainer.current_epoch == self.args.kill_after_epoch + 1:
            common.die(signal.SIGKILL)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.args.kill_at_step:
            common.die(signal.SIGKILL)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.progress.batch_done(trainer.current_epoch)
        if trainer.global_step == self.args.sigterm_at_step:
            common.die(signal.SIGTERM)  # Lightning stops at the end of this batch

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.progress.val_loss[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])


def main(argv: list[str]) -> int:
    args = common.parse_args(argv)
    L.seed_everything(common.SEED, verbose=False)
    x, y = common.train_set()
    xv, yv = common.validation_set()
    train = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=common.BATCH, shuffle=True)
    val = DataLoader(TensorDataset(torch.from_numpy(xv), torch.from_numpy(yv)), batch_size=common.VAL_SAMPLES)
    progress = common.Progress()
    checkpoint = BestCheckpoint(**args.checkpoint_kwargs())
    fit = trainer(L, [Probe(args, progress), checkpoint], args.epochs, num_sanity_val_steps=0)
    model = make_module(L, dropout=0.3, scheduler=True)
    fit.fit(model, train, val)
    weights = sorted((k, v.detach().cpu().numpy()) for k, v in model.state_dict().items())
    progress.write(args, digest=common.digest(weights), best_model_path=checkpoint.best_model_path,
                   global_step=fit.global_step, shuffled=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
