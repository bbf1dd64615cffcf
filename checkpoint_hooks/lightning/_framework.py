"""The `Framework` a `FitSession` drives in a Lightning fit: the Trainer saves, loads and restores itself."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from checkpoint_hooks.core.engine import TRAINING_STATE, SaveItem
from checkpoint_hooks.core.framework import ResumePoint
from checkpoint_hooks.core.resume_state import ResumeState
from checkpoint_hooks.torch.io import save_torch, set_torch_rng_state, torch_rng_state

if TYPE_CHECKING:
    from checkpoint_hooks.lightning.callback import BestCheckpoint

log = logging.getLogger("checkpoint_hooks")

EXTENSIONS = {TRAINING_STATE: ".ckpt", "weights": ".weights.pt", "model": ".model.pt"}


def _own_method(obj: Any, method: str, base: str, module_suffix: str) -> bool:
    """Whether `obj.method` is the one Lightning's class `base` defines (no subclass or instance overrides it)."""
    if method in vars(obj):
        return False
    for cls in type(obj).__mro__:
        if cls.__name__ == base and cls.__module__.endswith(module_suffix):
            return getattr(type(obj), method, None) is cls.__dict__.get(method)
    return False


def saves_with_torch_save(trainer: Any) -> bool:
    """Whether `trainer.save_checkpoint(path)` comes down to torch.save of the checkpoint dict on rank zero.

    True for the default checkpoint IO with the strategies that do not override saving (single
    device, DDP); FSDP, DeepSpeed, a custom or asynchronous CheckpointIO keep Lightning's own path.
    """
    strategy = trainer.strategy
    io = type(strategy.checkpoint_io)
    return (
        _own_method(trainer, "save_checkpoint", "Trainer", ".trainer.trainer")
        and _own_method(strategy, "save_checkpoint", "Strategy", ".strategies.strategy")
        and io.__name__ == "TorchCheckpointIO"
        and io.__module__.endswith(".plugins.io.torch_io")
    )


class LightningFramework:
    """The `Framework` of a Lightning fit: the Trainer saves, loads and restores its loops itself."""

    name = "Lightning"
    default_format = TRAINING_STATE
    resumable_formats = frozenset({TRAINING_STATE})
    epoch_base = 0
    resumes_mid_epoch = True  # the loops' progress is in the checkpoint
    handles_sigterm = True  # Lightning raises SIGTERMException, seen in on_exception
    broadcasts = True
    # a sharded strategy's folder: DCP unpickles .metadata, and Lightning loads meta.pt; checked before loading
    verified_before_load = (".metadata", "meta.pt")

    def __init__(self, owner: BestCheckpoint) -> None:
        self.owner = owner
        self.trainer: Any = None  # set in setup("fit"), cleared at its teardown
        self.buffers = owner._buffers.kept
        self.item: SaveItem | None = None  # being written: on_save_checkpoint puts its payload in the dict
        self.loading = False
        self.loaded: ResumeState | None = None  # the payload of the checkpoint Lightning restored last
        self.wrote = False  # a save ran (on every rank) since ModelCheckpoint's attributes were mirrored
        self._model_warned = False

    @property
    def index_beside(self) -> bool:
        """Only ModelCheckpoint's arguments: dirpath holds the checkpoint files alone, as ModelCheckpoint leaves it."""
        return bool(self.owner._as_model_checkpoint)

    @property
    def extensions(self) -> dict[str, str]:
        """EXTENSIONS, with a subclass's FILE_EXTENSION (ModelCheckpoint's) for its checkpoints."""
        return {**EXTENSIONS, TRAINING_STATE: self.owner.FILE_EXTENSION}

    def is_writer(self) -> bool:
        return bool(self.trainer.is_global_zero)

    def world_size(self) -> int:
        return int(self.trainer.world_size)

    def rank(self) -> int:
        return int(self.trainer.global_rank)

    def broadcast(self, value: Any) -> Any:
        return self.trainer.strategy.broadcast(value)

    def any_rank(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def write(self, item: SaveItem, path: str) -> None:
        trainer = self.trainer
        self.item, self.wrote = item, True
        try:
            if item.format == TRAINING_STATE:
                self.owner._save_checkpoint(trainer, path)  # every rank: the strategy gathers state, rank zero writes
            elif trainer.is_global_zero:
                module = trainer.lightning_module
                if item.format == "model" and not self._model_warned:
                    self._model_warned = True
                    log.warning(
                        "format='model' pickles the %s class: loading needs that class importable at the "
                        "same module path, and torch.load(..., weights_only=False)", type(module).__name__,
                    )
                save_torch(module.state_dict() if item.format == "weights" else module, path, self.owner.policy.verify)
        finally:
            self.item = None

    def can_snapshot(self, item: SaveItem) -> bool:
        return item.format != "model"

    def snapshot(self, item: SaveItem) -> Any:
        """What `write` would save, copied into host memory the background save owns (async_save)."""
        trainer = self.trainer
        self.item, self.wrote = item, True
        try:
            if item.format == TRAINING_STATE:
                state = trainer._checkpoint_connector.dump_checkpoint(False)  # every rank, as save_checkpoint does
                trainer.strategy.barrier("BestCheckpoint.snapshot")
            else:
                state = trainer.lightning_module.state_dict()
        finally:
            self.item = None
        return self.owner._buffers.copy(state) if trainer.is_global_zero else None

    def write_snapshot(self, item: SaveItem, snapshot: Any, path: str) -> None:
        save_torch(self.owner._buffers.ready(snapshot), path, self.owner.policy.verify)

    def load(self, path: str) -> ResumeState | None:
        """Load a checkpoint into the model and the callbacks, in on_fit_start: the last moment a callback can
        hand the Trainer a checkpoint, as it restores loops, optimizers and schedulers from it right after."""
        connector = self.trainer._checkpoint_connector
        connector._loaded_checkpoint = {}  # one that failed verification: its tensors go before the next load
        self.loaded, self.loading = None, True
        try:
            connector._restore_modules_and_callbacks(path)
        finally:
            self.loading = False
        return self.loaded

    def set_start(self, point: ResumePoint) -> None:
        """Nothing to do: Lightning continues from the loops' progress in the checkpoint, mid-epoch too."""

    def request_stop(self) -> None:
        self.trainer.should_stop = True

    rng_state = staticmethod(torch_rng_state)
    set_rng_state = staticmethod(set_torch_rng_state)
