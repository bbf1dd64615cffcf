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

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.engine import TRAINING_STATE, Engine, SaveItem
from checkpoint_hooks.core.framework import ResumePoint
from checkpoint_hooks.core.resume_state import ResumeState, read
from checkpoint_hooks.core.session import FitSession
from checkpoint_hooks.core.store import is_url
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, load_policy
from checkpoint_hooks.torch.io import SnapshotBuffers, save_torch, set_torch_rng_state, torch_rng_state

log = logging.getLogger("checkpoint_hooks")

EXTENSIONS = {TRAINING_STATE: ".ckpt", "weights": ".weights.pt", "model": ".model.pt"}
STATE_KEY = "checkpoint_hooks"  # the resume payload, a key of Lightning's checkpoint dict
RNG_KEY = "checkpoint_hooks_rng"  # what earlier releases kept there: every rank's random states


def _model_checkpoint_bases() -> tuple[type, ...]:
    bases = []
    for module in ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks"):
        try:
            bases.append(__import__(module, fromlist=["ModelCheckpoint"]).ModelCheckpoint)
        except ImportError:
            continue
    if not bases:
        raise ImportError("checkpoint_hooks.lightning needs PyTorch Lightning: pip install 'checkpoint-hooks[lightning]'")
    return tuple(bases)


_BASES = _model_checkpoint_bases()

# ModelCheckpoint arguments with no equivalent in the policy yet: refused rather than ignored.
_UNSUPPORTED = ("save_on_train_epoch_end",)


def lightning_filename(template: str) -> str:
    """Lightning's `auto_insert_metric_name`: '{epoch}-{val_loss:.2f}' -> 'epoch={epoch}-val_loss={val_loss:.2f}'."""

    def insert(match: re.Match[str]) -> str:
        start = match.start()
        name = match.group(1)
        if template[max(0, start - len(name) - 1) : start] == name + "=":
            return match.group(0)
        return f"{name}={match.group(0)}"

    return re.sub(r"\{([^{}:!]+)(?:[:!][^{}]*)?\}", insert, template)


def _metrics(trainer: Any) -> dict[str, Any]:
    """The logged values as numbers (tensors of one element), without the others."""
    values = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in trainer.callback_metrics.items()}
    return {k: v for k, v in values.items() if not isinstance(v, torch.Tensor) and v is not None}


def _own_method(obj: Any, method: str, base: str, module_suffix: str) -> bool:
    """Whether `obj.method` is the one Lightning's class `base` defines (no subclass or instance overrides it)."""
    if method in vars(obj):
        return False
    for cls in type(obj).__mro__:
        if cls.__name__ == base and cls.__module__.endswith(module_suffix):
            return getattr(type(obj), method, None) is cls.__dict__.get(method)
    return False


def _saves_with_torch_save(trainer: Any) -> bool:
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


class _Lightning:
    """The `Framework` of a Lightning fit: the Trainer saves, loads and restores its loops itself."""

    name = "Lightning"
    extensions = EXTENSIONS
    default_format = TRAINING_STATE
    resumable_formats = frozenset({TRAINING_STATE})
    epoch_base = 0
    resumes_mid_epoch = True  # the loops' progress is in the checkpoint
    handles_sigterm = True  # Lightning raises SIGTERMException, seen in on_exception
    broadcasts = True

    def __init__(self, owner: BestCheckpoint) -> None:
        self.owner = owner
        self.trainer: Any = None  # set in setup("fit"), cleared at its teardown
        self.buffers = owner._buffers.kept
        self.item: SaveItem | None = None  # being written: on_save_checkpoint puts its payload in the dict
        self.loading = False
        self.loaded: ResumeState | None = None  # the payload of the checkpoint Lightning restored last
        self.wrote = False  # a save ran (on every rank) since ModelCheckpoint's attributes were mirrored
        self._model_warned = False

    def is_writer(self) -> bool:
        return bool(self.trainer.is_global_zero)

    def world_size(self) -> int:
        return int(self.trainer.world_size)

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
        save_torch(snapshot, path, self.owner.policy.verify)

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


class BestCheckpoint(*_BASES):  # type: ignore[misc]
    """Keeps the best checkpoints by a monitored metric, snapshots and a rolling last; resumes automatically.

    Args:
        monitor: logged metric to rank by (read from `trainer.callback_metrics`).
        policy: a `CheckpointPolicy`, a dict, or a YAML path; keyword arguments override its fields.
        dirpath: where checkpoints go (local path or fsspec URL); default `<default_root_dir>/checkpoints`.
        filename: Lightning-style template; with `auto_insert_metric_name` '{epoch}' becomes 'epoch={epoch}'.
        save_top_k, save_last, every_n_epochs, save_weights_only, verbose, mode, every_n_train_steps,
            train_time_interval, save_on_exception: ModelCheckpoint's spellings, mapped onto the policy's
            `top_k`, `last`, `snapshots.every_n_epochs`, `format="weights"`, `verbose`, `mode`,
            `every_n_steps`, `every_n_minutes` and `save_on_preemption`.
        **policy_fields: any other policy field (top_k, min_delta, format, snapshots, resume, ...).
    """

    def __init__(
        self,
        monitor: str | None = None,
        *,
        policy: CheckpointPolicy | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        mode: str | None = None,
        save_top_k: int | None = None,
        save_last: bool | str | None = None,
        every_n_epochs: int | None = None,
        save_weights_only: bool | None = None,
        verbose: bool | None = None,
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        save_on_exception: bool | None = None,
        **policy_fields: Any,
    ) -> None:
        for name in _UNSUPPORTED:
            if name in policy_fields:
                raise PolicyError(
                    f"BestCheckpoint does not support {name} yet. Received: {name}={policy_fields[name]!r}; "
                    "remove it, or use Lightning's ModelCheckpoint for that trigger"
                )
        if save_last == "link":
            save_last = True  # the rolling last is a file of its own; there is nothing to link
        if save_top_k is not None and "top_k" in policy_fields:
            raise PolicyError("give save_top_k or top_k, not both. Received: save_top_k and top_k")
        overrides: dict[str, Any] = dict(policy_fields)
        mapped = {
            "monitor": monitor,
            "dirpath": os.fspath(dirpath) if dirpath is not None else None,
            "filename": lightning_filename(filename) if filename and auto_insert_metric_name else filename,
            "mode": mode,
            "top_k": save_top_k,
            "last": save_last,
            "verbose": verbose,
            "format": "weights" if save_weights_only else None,
            "every_n_steps": every_n_train_steps if every_n_train_steps != 0 else None,
            "every_n_minutes": train_time_interval.total_seconds() / 60 if train_time_interval else None,
            "save_on_preemption": save_on_exception,
        }
        overrides.update({k: v for k, v in mapped.items() if v is not None})
        if every_n_epochs is not None:
            overrides["snapshots"] = {"every_n_epochs": every_n_epochs or None}
        resolved = load_policy(policy, **overrides)
        # Without a dirpath of its own the directory lives under trainer.default_root_dir, stable
        # across runs (Lightning's versioned log folders would hide the previous run from resume).
        self._dirpath_given = resolved.dirpath != CheckpointPolicy.model_fields["dirpath"].default
        super().__init__(
            dirpath=None,
            monitor=resolved.monitor,
            verbose=resolved.verbose,
            save_last=resolved.last,
            save_top_k=resolved.top_k,
            save_weights_only=resolved.format == "weights",
            mode=resolved.resolved_mode,
        )
        self.policy = resolved
        self._buffers = SnapshotBuffers()
        self._framework = _Lightning(self)
        self.session = FitSession(resolved, self._framework)
        self._validated_epoch = -1
        self._ever_validated = False

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> BestCheckpoint:
        """A callback from a YAML policy file; keyword arguments override its fields."""
        return cls(policy=os.fspath(path), **overrides)

    @property
    def engine(self) -> Engine | None:
        return self.session.engine

    # -- setup and resume -------------------------------------------------------------

    def _resolve_dirpath(self, trainer: Any) -> str:
        dirpath = self.policy.dirpath
        if not self._dirpath_given and not is_url(dirpath) and not os.path.isabs(dirpath):
            dirpath = os.path.join(trainer.default_root_dir, dirpath)
        return dirpath

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._framework.trainer, self._framework.loaded = trainer, None
        dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        self.session.policy = self.policy.model_copy(update={"dirpath": dirpath})
        # open here: Lightning restores callbacks from a user's ckpt_path (load_state_dict) before on_fit_start
        self.dirpath = self.session.open().directory.url
        self._validated_epoch, self._ever_validated = -1, False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # With the user's own ckpt_path Lightning restores it (load_state_dict adopts it when it is one of ours).
        self.session.begin(restore="none" if trainer.ckpt_path is not None else "policy")
        # Last thing before the first epoch's data loader draws its shuffling seed.
        self.session.restore_rng(self._framework.loaded, trainer.global_rank)
        self._framework.loaded = None
        self._sync(trainer)

    # -- saving -----------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # the step Lightning restored (a user's ckpt_path is restored after on_fit_start): triggers count from it
        self.session.epoch_begin(trainer.current_epoch, step=trainer.global_step)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch
            self._ever_validated = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        self.session.batch_end(trainer.global_step, last_batch=last, metrics=lambda: _metrics(trainer))
        if self._framework.wrote:
            self._sync(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = _metrics(trainer)
        monitor = self.policy.monitor
        if monitor is not None:
            if monitor not in metrics:
                # missing before the first validation is expected; after one, it is an error
                self.session.check_monitor(metrics, strict=trainer.fit_loop.epoch_loop.val_loop._has_run)
            elif self._ever_validated and self._validated_epoch != trainer.current_epoch:
                # Validation skipped this epoch: its values are from an earlier one, so do not rank them.
                metrics.pop(monitor)
        self.session.epoch_end(trainer.current_epoch, trainer.global_step, metrics)
        self._sync(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # the rolling last was saved at the final epoch end; a background save of it finishes here
        if self.session.engine is not None:
            self.session.engine.wait()
            self._sync(trainer)

    def _save_checkpoint(self, trainer: Any, path: str) -> None:
        """What `trainer.save_checkpoint(path)` does, with the file written through `save_torch` when it may.

        Lightning's default IO pickles the whole checkpoint into memory first and copies it to the file
        through a temporary one; torch.save into a DurableFile writes it once, hashed on the way.
        """
        if not _saves_with_torch_save(trainer):
            trainer.save_checkpoint(path)
            return
        with trainer.profiler.profile("save_checkpoint"):
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(False)
            if trainer.is_global_zero:  # as Strategy.save_checkpoint: rank zero writes
                save_torch(checkpoint, path, self.policy.verify)
            trainer.strategy.barrier("Trainer.save_checkpoint")

    # -- ModelCheckpoint's public attributes ---------------------------------------------

    def _sync(self, trainer: Any) -> None:
        """Mirror the engine's view into ModelCheckpoint's attributes, identical on every rank."""
        summary = None
        self._framework.wrote = False
        engine = self.session.engine
        if trainer.is_global_zero and engine is not None:
            ranked = engine.top_k_records()
            monitor = self.policy.monitor
            summary = {
                "best_k_models": {engine.path_of(r): r.score(monitor) for r in ranked},
                "best_model_path": engine.best_model_path,
                "best_model_score": engine.best_model_score,
                "kth_best_model_path": engine.path_of(ranked[-1]) if ranked else "",
                "kth_value": ranked[-1].score(monitor) if ranked else None,
                "last_model_path": engine.last_model_path,
            }
        summary = trainer.strategy.broadcast(summary)
        if summary is None:
            return

        def tensor(value: float | None) -> torch.Tensor | None:
            return None if value is None else torch.tensor(value)

        self.best_k_models = {path: tensor(score) for path, score in summary["best_k_models"].items()}
        self.best_model_path = summary["best_model_path"]
        self.best_model_score = tensor(summary["best_model_score"])
        self.kth_best_model_path = summary["kth_best_model_path"]
        self.kth_value = tensor(summary["kth_value"])
        self.last_model_path = summary["last_model_path"]

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        """What `trainer.fit(ckpt_path="last")` loads: the newest committed training state."""
        directory = CheckpointDirectory(self._resolve_dirpath(trainer))
        manifest = directory.read_manifest()
        resumable = [r for r in manifest.records if r.format == TRAINING_STATE] if manifest is not None else []
        return {directory.store.join(max(resumable, key=lambda r: r.seq).primary_path)} if resumable else set()

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        engine = self.session.engine
        state = engine.state_dict() if engine is not None and engine.is_writer else {}
        state["monitor"] = self.policy.monitor
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        engine, fw = self.session.engine, self._framework
        # Only in a fit; automatic resume adopts its checkpoint once it verifies, not while it loads.
        if engine is not None and fw.trainer is not None and not (fw.loading and self.session.policy.resume == "auto"):
            engine.load_state_dict(state_dict)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        mine = self.session.rng_state()
        states: list[Any] = [mine]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, mine)
        item = self._framework.item
        # a save of the user's own (trainer.save_checkpoint): where in the epoch it is, is Lightning's to know
        payload = self.session.payload(item, rng=states) if item is not None else ResumeState(None, trainer.global_step, rng=states)
        checkpoint[STATE_KEY] = payload.to_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._framework.loaded = read(checkpoint[STATE_KEY] if STATE_KEY in checkpoint else checkpoint.get(RNG_KEY))

    # -- end --------------------------------------------------------------------------

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # SIGTERMException, Ctrl-C or an error: the session saves a training state when its rules say so
        try:
            self.session.on_exception(exception)
        finally:
            self._framework.trainer = None  # no teardown hook follows an exception

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            try:
                self.session.end()
            finally:
                self._framework.trainer = None

    def __repr__(self) -> str:
        return f"BestCheckpoint(monitor={self.policy.monitor!r}, dirpath={self.policy.dirpath!r}, top_k={self.policy.top_k})"
