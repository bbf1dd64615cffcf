"""`BestCheckpoint`, a `ModelCheckpoint` driven by the shared policy (see `checkpoint_hooks.lightning`)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.engine import TRAINING_STATE, Engine
from checkpoint_hooks.core.records import BEST
from checkpoint_hooks.core.resume_state import ResumeState, read
from checkpoint_hooks.core.retention import rank_value
from checkpoint_hooks.core.session import FitSession
from checkpoint_hooks.core.store import is_url
from checkpoint_hooks.lightning._compat import lightning_score, link_file, logged_metrics, remove_path
from checkpoint_hooks.lightning._errors import MISCONFIGURATION, argument_error
from checkpoint_hooks.lightning._framework import LightningFramework, saves_with_torch_save
from checkpoint_hooks.lightning._signature import (
    explicit_signature,
    lightning_filename,
    model_checkpoint_bases,
    placeholders,
)
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, load_policy
from checkpoint_hooks.torch.io import SnapshotBuffers, save_torch

log = logging.getLogger("checkpoint_hooks")

STATE_KEY = "checkpoint_hooks"  # the resume payload, a key of Lightning's checkpoint dict
RNG_KEY = "checkpoint_hooks_rng"  # what earlier releases kept there: every rank's random states
# Lightning's default name, '{epoch}-{step}' with the metric names inserted
LIGHTNING_DEFAULT_FILENAME = "epoch={epoch}-step={step}"

_BASES = model_checkpoint_bases()


class BestCheckpoint(*_BASES):  # type: ignore[misc]
    """Keeps the best checkpoints by a monitored metric, snapshots and a rolling last; resumes automatically.

    A drop-in `ModelCheckpoint`: its arguments come first, in its order, and are checked as it checks
    them; with only those arguments, files are named as ModelCheckpoint names them.

    Args:
        dirpath: where checkpoints go (local path or fsspec URL); default `<default_root_dir>/checkpoints`.
        filename: Lightning-style template; with `auto_insert_metric_name` '{epoch}' becomes 'epoch={epoch}'.
        monitor: logged metric to rank by (read from `trainer.callback_metrics`; also `epoch` and `step`).
        verbose, save_last, save_top_k, save_on_exception, save_weights_only, mode, every_n_train_steps,
            train_time_interval, every_n_epochs: ModelCheckpoint's spellings, mapped onto the policy's
            `verbose`, `last`, `top_k`, `save_on_preemption`, `format="weights"`, `mode`, `every_n_steps`,
            `every_n_minutes` and `snapshots.every_n_epochs`.
        save_on_train_epoch_end, enable_version_counter: accepted as ModelCheckpoint's; checkpoints are
            ranked at the end of each training epoch, and names are made unique with '-v1', '-v2', ...
        policy: a `CheckpointPolicy`, a dict, or a YAML path; the other arguments override its fields.
        **policy_fields: any other policy field (top_k, min_delta, format, snapshots, resume, ...),
            each listed in the signature.
    """

    # A fit's machinery, not the callback's state: kept out of vars() (so copies compare equal) and pickles.
    # (Hidden from mypy, which cannot see that the base classes give instances a __dict__ as well.)
    if not TYPE_CHECKING:
        __slots__ = ("_buffers", "_framework", "session")

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool | None = None,
        save_last: bool | str | None = None,
        save_top_k: int | None = None,
        save_on_exception: bool | None = None,
        save_weights_only: bool | None = None,
        mode: str | None = None,
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        *,
        policy: CheckpointPolicy | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        **policy_fields: Any,
    ) -> None:
        policy_fields = {k: v for k, v in policy_fields.items() if v is not None}
        # Only ModelCheckpoint's arguments: it is the one replaced, so its names apply.
        self._as_model_checkpoint = policy is None and not policy_fields
        if save_top_k is not None and "top_k" in policy_fields:
            raise PolicyError("give save_top_k or top_k, not both. Received: save_top_k and top_k")
        template = None  # the policy's default names the monitor
        if filename is not None or self._as_model_checkpoint:
            template = filename or "{epoch}-{step}"
            template = lightning_filename(template) if auto_insert_metric_name else template
            # ModelCheckpoint would make a subfolder of 'val/loss' in a name: here it becomes 'val_loss'
            template = template.replace("/", "_")
        overrides: dict[str, Any] = dict(policy_fields)
        mapped = {
            "monitor": monitor,
            "dirpath": self._expanded(dirpath),
            "filename": template,
            "mode": mode,
            "top_k": save_top_k,
            "last": bool(save_last) if save_last is not None else None,
            "verbose": verbose,
            "format": "weights" if save_weights_only else None,
            "save_on_preemption": save_on_exception,
        }
        overrides.update({k: v for k, v in mapped.items() if v is not None})
        resolved, policy_error = None, None
        try:
            resolved = load_policy(policy, **overrides)
        except PolicyError as exc:
            policy_error = exc
        try:  # ModelCheckpoint's own checks: its exception type and wording, for code that expects them
            super().__init__(
                dirpath=dirpath, filename=filename, verbose=bool(verbose), save_last=save_last,
                save_on_exception=bool(save_on_exception), save_weights_only=bool(save_weights_only),
                auto_insert_metric_name=auto_insert_metric_name, every_n_train_steps=every_n_train_steps,
                train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
                save_on_train_epoch_end=save_on_train_epoch_end, enable_version_counter=enable_version_counter,
                monitor=monitor if monitor is not None or resolved is None else resolved.monitor,
                mode=mode if mode not in (None, "auto") else resolved.resolved_mode if resolved else "min",
                save_top_k=save_top_k if save_top_k is not None else resolved.top_k if resolved else 1,
            )
        except MISCONFIGURATION as exc:
            raise argument_error(exc, policy_error) from None
        if policy_error is not None:
            raise policy_error
        assert resolved is not None
        self.mode = resolved.resolved_mode  # mode='auto' resolved from the monitor's name
        self.kth_value: torch.Tensor | None = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        # Without a dirpath of its own the directory lives under trainer.default_root_dir, stable
        # across runs (Lightning's versioned log folders would hide the previous run from resume).
        self._dirpath_given = resolved.dirpath != CheckpointPolicy.model_fields["dirpath"].default
        self.policy = resolved
        self._buffers = SnapshotBuffers()
        self._framework = LightningFramework(self)
        self.session = FitSession(resolved, self._framework)
        self._validated_epoch = -1
        self._ever_validated = False
        self._deferred = False  # a step or time trigger waits for the monitor, logged by validation
        self._saved_this_fit = False
        self._last_alias = ""  # the 'last.ckpt' made last (save_last)

    @staticmethod
    def _expanded(dirpath: str | os.PathLike[str] | None) -> str | None:
        """A local dirpath with '~' expanded and made absolute, as ModelCheckpoint keeps it; a URL as given."""
        if not dirpath:
            return None  # '' is no dirpath for ModelCheckpoint either
        path = os.fspath(dirpath)
        return path if is_url(path) else os.path.realpath(os.path.expanduser(path))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> BestCheckpoint:
        """A callback from a YAML policy file; keyword arguments override its fields."""
        return cls(policy=os.fspath(path), **overrides)

    @property
    def engine(self) -> Engine | None:
        return self.session.engine

    @property
    def best_model_path(self) -> str:
        """The best checkpoint; before a fit, the best one the directory's manifest lists, so that a new
        process's `trainer.test(ckpt_path="best")` finds what the training run kept."""
        path = str(self.__dict__.get("_best_model_path", ""))
        session = getattr(self, "session", None)
        if path or session is None or session.engine is not None:
            return path
        return self._best_in_directory()

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        self.__dict__["_best_model_path"] = path

    def _best_in_directory(self) -> str:
        if not self._dirpath_given:
            return ""  # under trainer.default_root_dir: unknown before a Trainer sets the callback up
        directory = CheckpointDirectory(self.policy.dirpath)
        manifest = directory.read_manifest()
        if manifest is None or not manifest.records:
            return ""
        members = manifest.holders(max(manifest.records, key=lambda r: r.seq).run, BEST)  # the newest run's
        monitor, mode = self.policy.monitor, self.policy.resolved_mode
        if not members:
            return ""
        if monitor is None:
            best = max(members, key=lambda r: r.seq)
        else:
            best = min(members, key=lambda r: (rank_value(r.score(monitor), mode), r.seq))
        return str(directory.store.join(best.primary_path))

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key: a checkpoint saved by either loads its state into the other."""
        return str(super().state_key).replace(type(self).__qualname__ + "{", "ModelCheckpoint{", 1)


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
        self._last_global_step_saved = 0
        dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        if self.save_last == "link" and is_url(dirpath):
            raise ValueError(
                f"`ModelCheckpoint(save_last='link')` is only supported for local file paths, got `dirpath={dirpath}`."
            )
        self.session.policy = self.policy.model_copy(update={"dirpath": dirpath})
        # open here: Lightning restores callbacks from a user's ckpt_path (load_state_dict) before on_fit_start
        self.dirpath = self.session.open().directory.url
        self._validated_epoch, self._ever_validated, self._deferred = -1, False, False
        self._saved_this_fit = False

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

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_time_checked = time.monotonic()  # train_time_interval counts from here, as in ModelCheckpoint

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._validated_epoch = trainer.current_epoch
        self._ever_validated = True
        # ModelCheckpoint's rule: with validation more or less often than once an epoch, rank at its end
        if not self._should_save_on_train_epoch_end(trainer):
            last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            self._save_point(trainer, mid_epoch=not last_batch, deferred=self._deferred)

    def _named_metrics(self, trainer: Any) -> dict[str, Any]:
        """The logged values, with 0 for a filename placeholder not logged (ModelCheckpoint's names), and
        `epoch` or `step` when monitored: ModelCheckpoint offers them (`monitor="step"` ranks by recency)."""
        metrics = logged_metrics(trainer)
        if self.policy.monitor == "epoch":
            metrics.setdefault("epoch", trainer.current_epoch)
        if self.policy.monitor == "step":
            metrics.setdefault("step", trainer.global_step)
        if self._as_model_checkpoint and self.policy.filename is not None:
            for name in placeholders(self.policy.filename):
                if name not in (self.policy.monitor, "epoch", "step"):  # the names get those two anyway
                    metrics.setdefault(name, 0)
        return metrics

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        self.session.batch_end(trainer.global_step, last_batch=last, metrics=lambda: self._named_metrics(trainer))
        if self._steps_or_time_due(trainer) and not self._should_skip_saving_checkpoint(trainer):
            monitor = self.policy.monitor
            if monitor is not None and monitor not in self._named_metrics(trainer):
                self._deferred = True  # not logged yet (logged by validation): saved when validation ends
            else:
                self._save_point(trainer, mid_epoch=not last, deferred=True)
        if self._framework.wrote:
            self._sync(trainer)

    def _steps_or_time_due(self, trainer: Any) -> bool:
        """ModelCheckpoint's `every_n_train_steps` and `train_time_interval`: a ranked save after this batch."""
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        interval = self._train_time_interval
        if interval is not None:
            now = time.monotonic()
            elapsed = self._last_time_checked is not None and now - self._last_time_checked >= interval.total_seconds()
            if trainer.strategy.broadcast(elapsed):  # one decision for every rank
                self._last_time_checked = now
                due = True
        return bool(due)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and self._should_save_on_train_epoch_end(trainer):
            self._save_point(trainer, mid_epoch=False)

    def _save_point(self, trainer: Any, *, mid_epoch: bool, deferred: bool = False) -> None:
        """Rank the logged values and save what the policy asks for, where ModelCheckpoint would.

        Args:
            mid_epoch: inside the epoch (a validation every N batches, a step or time trigger).
            deferred: a step or time trigger (now, or waiting for the monitor): saved whatever `every_n_epochs` says.
        """
        if self._should_skip_saving_checkpoint(trainer):
            return
        every = self._every_n_epochs
        if not deferred and not (every >= 1 and (trainer.current_epoch + 1) % every == 0):
            return  # ModelCheckpoint(every_n_epochs=N) ranks after every N-th epoch only; 0 never at epoch ends
        self._deferred = False
        metrics = self._named_metrics(trainer)
        monitor = self.policy.monitor
        if monitor is not None:
            if monitor not in metrics:
                # missing before the first validation is expected; after one, it is an error
                self.session.check_monitor(metrics, strict=trainer.fit_loop.epoch_loop.val_loop._has_run)
            elif not mid_epoch and self._ever_validated and self._validated_epoch != trainer.current_epoch:
                # Validation skipped this epoch: its values are from an earlier one, so do not rank them.
                metrics.pop(monitor)
            if isinstance(metrics.get(monitor), (int, float)):
                self.current_score = lightning_score(float(metrics[monitor]), self.mode)
        if mid_epoch:
            self.session.within_epoch(trainer.current_epoch, trainer.global_step, metrics)
        else:
            self.session.epoch_end(trainer.current_epoch, trainer.global_step, metrics)
        if self._framework.wrote:
            self._last_global_step_saved = trainer.global_step
            self._saved_this_fit = True
        self._sync(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # the rolling last was saved at the final epoch end; a background save of it finishes here
        if self.session.engine is None:
            return
        if self.save_last and self.policy.last and not self._saved_this_fit and not trainer.fast_dev_run:
            # ModelCheckpoint(save_last=True) where nothing was saved (no validation to save at): a last all the same
            self.session.save_training_state(mid_epoch=False)
        self.session.engine.wait()
        self._sync(trainer)

    def _save_checkpoint(self, trainer: Any, path: str) -> None:
        """What `trainer.save_checkpoint(path)` does, with the file written through `save_torch` when it may.

        Lightning's default IO pickles the whole checkpoint into memory first and copies it to the file
        through a temporary one; torch.save into a DurableFile writes it once, hashed on the way.
        """
        if not saves_with_torch_save(trainer):
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
                "last_at": (last.epoch, last.step) if (last := engine.last_record) is not None else None,
                "newest": engine.path_of(max(engine.manifest.records, key=lambda r: r.seq)) if engine.manifest.records else "",
            }
        summary = trainer.strategy.broadcast(summary)
        if summary is None:
            return

        def tensor(value: float | None) -> torch.Tensor | None:
            if value is None:  # ranked with a NaN: ModelCheckpoint keeps the worst score there is
                return None if self.policy.monitor is None else lightning_score(math.nan, self.mode)
            return torch.tensor(value)

        monitored = self.policy.monitor is not None  # without a monitor ModelCheckpoint ranks nothing
        self.best_k_models = {path: tensor(score) for path, score in summary["best_k_models"].items()} if monitored else {}
        self.best_model_path = summary["best_model_path"]
        self.best_model_score = tensor(summary["best_model_score"])
        self.kth_best_model_path = summary["kth_best_model_path"] if monitored else ""
        self.kth_value = tensor(summary["kth_value"])
        self.last_model_path = self._alias_last(trainer, summary["last_model_path"], summary["last_at"])
        # the file saved last: 'last.ckpt' itself where it is a file of its own (save_last=True), as in ModelCheckpoint
        alias_is_a_file = self.save_last is True and self.last_model_path != summary["last_model_path"]
        self._last_checkpoint_saved = self.last_model_path if alias_is_a_file else summary["newest"]

    def _alias_last(self, trainer: Any, target: str, at: tuple[int, int] | None) -> str:
        """ModelCheckpoint(save_last=True or 'link'): 'last.ckpt' (CHECKPOINT_NAME_LAST) is the newest training
        state, a hard link to it (a symbolic one for 'link'), so scripts that load `last.ckpt` keep working.

        Args:
            target: the newest training state's path.
            at: its (epoch, step), for a CHECKPOINT_NAME_LAST with placeholders.

        Returns the path `last_model_path` shows: the alias, or `target` where there is none.
        """
        if not self.save_last or not target or is_url(target):
            return target
        values = self._monitor_candidates(trainer)
        if at is not None:
            values.update(epoch=torch.tensor(at[0]), step=torch.tensor(at[1]))
        alias = str(self.format_checkpoint_name(values, self.CHECKPOINT_NAME_LAST))
        if trainer.is_global_zero and os.path.abspath(alias) != os.path.abspath(target):
            link_file(target, alias, symbolic=self.save_last == "link")
            previous, self._last_alias = self._last_alias, alias
            if previous and previous != alias:
                remove_path(previous)  # a name with placeholders ('last-{epoch}'): one alias, as ModelCheckpoint keeps
        return alias

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        """What `trainer.fit(ckpt_path="last")` loads: the newest committed training state; in a directory
        without a manifest, what ModelCheckpoint finds there ('last.ckpt', 'last-v1.ckpt', ...)."""
        directory = CheckpointDirectory(self._resolve_dirpath(trainer))
        manifest = directory.read_manifest()
        if manifest is None:
            return set(super()._find_last_checkpoints(trainer))
        resumable = [r for r in manifest.records if r.format == TRAINING_STATE]
        return {directory.store.join(max(resumable, key=lambda r: r.seq).primary_path)} if resumable else set()

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps: the arguments and ModelCheckpoint's attributes, not a fit's session."""
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._buffers = SnapshotBuffers()
        self._framework = LightningFramework(self)
        self.session = FitSession(self.policy, self._framework)

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """ModelCheckpoint's state (best and current scores, paths), with the record the checkpoint is."""
        engine = self.session.engine
        state = engine.state_dict() if engine is not None and engine.is_writer else {}
        state.update(super().state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        engine, fw = self.session.engine, self._framework
        if fw.loading and self.session.policy.resume == "auto":
            return  # automatic resume adopts its checkpoint once it verifies, not while it loads
        # ModelCheckpoint's attributes, as it restores them; not after a fit (trainer.test(ckpt_path="best")),
        # where the directory's record of the best is newer than the one inside that checkpoint
        if "best_model_path" in state_dict and (engine is None or fw.trainer is not None):
            super().load_state_dict(state_dict)
        if engine is not None and fw.trainer is not None:
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
        states = checkpoint.get("callbacks")
        earlier = str(super().state_key)  # the key earlier releases saved this callback's state under
        if isinstance(states, dict) and earlier in states and self.state_key not in states:
            states[self.state_key] = states.pop(earlier)
        self._framework.loaded = read(checkpoint[STATE_KEY] if STATE_KEY in checkpoint else checkpoint.get(RNG_KEY))

    # -- end --------------------------------------------------------------------------

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # SIGTERMException, Ctrl-C or an error: the session saves a training state when its rules say so
        try:
            if self._framework.trainer is not None and self._should_save_on_exception(trainer):
                self._save_as_model_checkpoint_on(trainer, exception)
            self.session.on_exception(exception)
        finally:
            self._framework.trainer = None  # no teardown hook follows an exception

    def _save_as_model_checkpoint_on(self, trainer: Any, exception: BaseException) -> None:
        """ModelCheckpoint(save_on_exception=True): its file, named from `filename`, next to the others.

        It is not one of the policy's checkpoints (the manifest does not list it); the training state
        the session saves on an exception (`save_on_preemption`) is the one automatic resume uses.
        """
        try:
            path = self.format_checkpoint_name(self._monitor_candidates(trainer))
            self._save_checkpoint(trainer, path)
            self._last_global_step_saved = trainer.global_step
            log.info("%s stopped training: saved %s", type(exception).__name__, path)
        except Exception as exc:  # the exception on its way is the one to see
            log.error("could not save a checkpoint after %s: %s", type(exception).__name__, exc)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            try:
                self.session.end()
            finally:
                self._framework.trainer = None

    def __repr__(self) -> str:
        return f"BestCheckpoint(monitor={self.policy.monitor!r}, dirpath={self.policy.dirpath!r}, top_k={self.policy.top_k})"


BestCheckpoint.__init__.__signature__ = explicit_signature(BestCheckpoint.__init__, _BASES[0].__init__)  # type: ignore[attr-defined,misc]
