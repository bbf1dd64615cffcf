"""PyTorch Lightning adapter: `BestCheckpoint`, a `ModelCheckpoint` driven by the shared policy.

    from checkpoint_hooks.lightning import BestCheckpoint
    trainer = Trainer(callbacks=[BestCheckpoint(monitor="val_loss")])
    trainer.fit(model)      # run the same script again after a crash: it continues

The class derives from the `ModelCheckpoint` of every Lightning namespace installed
(`lightning.pytorch` and `pytorch_lightning`), so one class works with either Trainer,
is found as `trainer.checkpoint_callback`, and keeps Lightning from adding its own.
A `FitSession` runs the fit (resume choice, triggers, preemption); the Trainer saves
and restores its own checkpoint dict, which carries the resume payload under `STATE_KEY`.
"""

from checkpoint_hooks.lightning._framework import EXTENSIONS
from checkpoint_hooks.lightning._signature import lightning_filename
from checkpoint_hooks.lightning.callback import RNG_KEY, STATE_KEY, BestCheckpoint

__all__ = ["EXTENSIONS", "RNG_KEY", "STATE_KEY", "BestCheckpoint", "lightning_filename"]
