"""`BestCheckpoint`: ModelCheckpoint's hooks turned into calls of the shared `FitSession`."""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras

from checkpoint_hooks.core.engine import Engine, Plan
from checkpoint_hooks.core.errors import MonitorError
from checkpoint_hooks.core.preemption import SigtermWatch
from checkpoint_hooks.core.records import BEST
from checkpoint_hooks.core.retention import is_better
from checkpoint_hooks.core.session import FitSession, KeptCheckpoints
from checkpoint_hooks.keras.arguments import KERAS_EXT, WEIGHTS_EXT, Default, build_policy, given, plain, resolve_mode
from checkpoint_hooks.keras.export import export_best
from checkpoint_hooks.keras.framework import KerasFramework
from checkpoint_hooks.keras.guard import FitGuard
from checkpoint_hooks.policy import CheckpointPolicy, SnapshotPolicy

log = logging.getLogger("checkpoint_hooks")


class BestCheckpoint(KeptCheckpoints, keras.callbacks.ModelCheckpoint):  # type: ignore[misc]
    """ModelCheckpoint with top-k retention, snapshots, a rolling last checkpoint and automatic resume.

    Drop-in mode: given `filepath` and only ModelCheckpoint's arguments, it does
    exactly what `keras.callbacks.ModelCheckpoint` does. Policy mode: switched on
    by leaving `filepath` out, by `policy=`, or by any argument after the `*`.
    A `filepath` in policy mode gives dirpath, filename and extension.

    Args:
        filepath: ModelCheckpoint's path template (`{epoch}`, `{batch}`, metric placeholders);
            optional in policy mode.
        monitor: the logged metric to rank checkpoints by (`"val_loss"` unless a policy says otherwise).
            In policy mode a name that is not logged stops fit() at the first epoch end that logs
            metrics of its kind (a MonitorError naming the closest logged key); drop-in mode warns.
        verbose: ModelCheckpoint's verbosity; in policy mode > 0 logs saves at INFO on the
            "checkpoint_hooks" logger.
        save_best_only: save only when the monitored value improves.
        save_weights_only: save `.weights.h5` files (policy mode: `format="weights"`).
        mode: "min", "max" or "auto".
        save_freq: "epoch", or an integer number of batches. In policy mode an integer N means
            `every_n_steps=N`: counted in optimizer steps, so it goes on across a resume.
        initial_value_threshold: a checkpoint counts as best only when it beats this value.
        policy: a `CheckpointPolicy`, a mapping, or a YAML file path; other arguments override it.
        dirpath: checkpoint directory (local path or fsspec URL).
        filename: name template without extension, e.g. "epoch={epoch:03d}-{val_loss:.4f}";
            `{epoch}` counts from 1 as in ModelCheckpoint. A ".h5" ending asks for legacy HDF5 models.
        format: "weights" (.weights.h5), "model" (.keras, the default) or "training_state" (.keras).
        top_k: best checkpoints kept (-1 all, 0 none).
        min_delta: an improvement smaller than this does not count.
        snapshots: save every N epochs outside the top-k rotation: an int N, a mapping
            `{"every_n_epochs": N, "keep": M}`, or a `SnapshotPolicy`.
        last: keep a rolling checkpoint of the newest epoch (the resume point).
        resume: "auto" continues from the newest verified checkpoint, "never" starts fresh,
            or a path to a checkpoint to continue from. A checkpoint that ends fit()'s last epoch
            trains nothing more; a warning says so and names the best checkpoint.
        verify: checksum every file and verify it before resuming from it.
        on_save_error: "raise" stops training when a save fails, "warn" trains on.
        every_n_steps: also save a training state every N optimizer steps, mid-epoch (the
            rolling last; a resume restarts its epoch from the first batch).
        every_n_minutes: also save a training state when this much wall time passed since the
            last save.
        save_on_preemption: on SIGTERM, or an exception escaping a training step, save a training
            state tagged `preempted` before the process ends (default True).
        async_save: write the files at the epoch end and leave their hashing, fsync, the commit and
            pruning to a background thread while training goes on (default False).
        fsync: flush every file to the disk before its commit (default True; False: safe against a
            killed process, not against a power loss).
        trust_other_owners: resume from checkpoints that belong to another user (default False:
            refused, since loading a checkpoint can run code it holds).
        export_best: also export the best model as a TensorFlow SavedModel in
            `<dirpath>/best_export/` (for serving; `keras.layers.TFSMLayer` loads it).
    """

    def __init__(
        self,
        filepath: str | os.PathLike[str] | None = None,
        monitor: str | None = Default("val_loss"),  # type: ignore[assignment]
        verbose: int = Default(0),  # type: ignore[assignment]
        save_best_only: bool = Default(False),  # type: ignore[assignment]
        save_weights_only: bool = Default(False),  # type: ignore[assignment]
        mode: str = Default("auto"),  # type: ignore[assignment]
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        policy: CheckpointPolicy | Mapping[str, Any] | str | Path | None = None,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        format: str | None = None,
        top_k: int | None = None,
        min_delta: float | None = None,
        snapshots: int | Mapping[str, Any] | SnapshotPolicy | None = None,
        last: bool | None = None,
        resume: str | os.PathLike[str] | None = None,
        verify: bool | None = None,
        on_save_error: str | None = None,
        every_n_steps: int | None = None,
        every_n_minutes: float | None = None,
        save_on_preemption: bool | None = None,
        async_save: bool | None = None,
        fsync: bool | None = None,
        trust_other_owners: bool | None = None,
        export_best: bool = False,
    ) -> None:
        fields = {
            "dirpath": None if dirpath is None else os.fspath(dirpath),
            "filename": filename,
            "format": format,
            "top_k": top_k,
            "min_delta": min_delta,
            "snapshots": {"every_n_epochs": snapshots}
            if isinstance(snapshots, int) and not isinstance(snapshots, bool)
            else snapshots,
            "last": last,
            "resume": None if resume is None else os.fspath(resume),
            "verify": verify,
            "on_save_error": on_save_error,
            "every_n_steps": every_n_steps,
            "every_n_minutes": every_n_minutes,
            "save_on_preemption": save_on_preemption,
            "async_save": async_save,
            "fsync": fsync,
            "trust_other_owners": trust_other_owners,
        }
        self._policy_mode = (
            filepath is None or policy is not None or export_best or any(v is not None for v in fields.values())
        )
        mode_value = plain(mode)
        if mode_value not in ("auto", "min", "max"):
            # ModelCheckpoint's own wording, so tests written against it keep matching.
            warnings.warn(f"ModelCheckpoint mode '{mode_value}' is unknown, fallback to auto mode.", stacklevel=2)
            mode_value = "auto"
        weights_only = bool(plain(save_weights_only))
        # ModelCheckpoint validates a path; without one, a path with the right extension stands in for the policy's names.
        checked = filepath if filepath is not None else "checkpoint" + (WEIGHTS_EXT if weights_only else KERAS_EXT)
        super().__init__(
            checked,
            monitor=plain(monitor),
            verbose=plain(verbose),
            save_best_only=plain(save_best_only),
            save_weights_only=weights_only,
            mode=mode_value,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        self._threshold = initial_value_threshold
        self._policy: CheckpointPolicy | None = None
        self.session: FitSession | None = None  # policy mode only: drop-in mode is ModelCheckpoint alone
        self.export_path: str | None = None
        self._export = bool(export_best)
        self._guard = FitGuard(on_exception=self._on_step_exception, on_stale=lambda: self._end_fit(failing=True))
        self._fits = 0
        self._warned_monitor = False
        self._mode_settled = False
        self._validated = False  # validation ran in the current epoch (Keras's fit calls on_test_begin for it)
        self._epoch_batches = 0  # batches of the current epoch
        self._step = 0  # the optimizer step: read at fit start and each epoch end, counted in between
        if not self._policy_mode:
            return

        self._policy, legacy = build_policy(
            filepath,
            fields,
            policy=policy,
            monitor=monitor,
            mode=mode_value if given(mode) else mode,
            save_best_only=save_best_only,
            verbose=verbose,
            weights_only=weights_only,
            save_freq=save_freq,
            export_best=self._export,
        )
        self._framework = KerasFramework(self, legacy=legacy)
        self.session = FitSession(self._policy, self._framework)
        if filepath is None:
            self.filepath = None
        self.monitor = self._policy.monitor
        self.mode = self._policy.mode
        self.min_delta = self._policy.min_delta
        self.save_best_only = self._policy.save_best_only
        self.save_weights_only = (self._policy.format or "model") == "weights"
        self.verbose = int(self._policy.verbose) if not given(verbose) else plain(verbose)

    @classmethod
    def from_yaml(cls, path: str | Path, **kwargs: Any) -> BestCheckpoint:
        """A callback from a YAML policy file; keyword arguments override its fields.

        Args:
            path: the YAML policy file.
            **kwargs: any argument of `BestCheckpoint` (overrides the file).
        """
        return cls(policy=CheckpointPolicy.from_yaml(path), **kwargs)

    def _set_monitor_op(self) -> None:
        try:
            super()._set_monitor_op()
        except ValueError as exc:
            # ModelCheckpoint's wording, so tests written against it keep matching.
            raise ValueError(
                str(exc).replace(f"{type(self).__name__} callback", "ModelCheckpoint callback", 1)
            ) from None

    # -- read-only state --------------------------------------------------------------

    @property
    def policy(self) -> CheckpointPolicy | None:
        """The policy in force; None in drop-in mode."""
        return self._policy

    @property
    def engine(self) -> Engine | None:
        """The engine of the current (or latest) fit; None in drop-in mode or before fit()."""
        return self.session.engine if self.session is not None else None

    @property
    def preempted(self) -> bool:
        """True once a SIGTERM (or a failing training step) stopped the current or latest fit().

        After a SIGTERM it turns True at once; the training state tagged `preempted` follows at the
        next batch end.
        """
        session = self.session
        return session is not None and (session.preempted or session.stop_requested())

    @property
    def _watch(self) -> SigtermWatch | None:
        """The SIGTERM handler of the current or latest fit()."""
        return self.session.watch if self.session is not None else None

    @property
    def _wrapper(self) -> Any:
        """The wrapper of `model.train_function` during fit()."""
        return self._guard.wrapper

    @property
    def _host_buffers(self) -> Any:
        """The host arrays background saves copy the state into."""
        return self._framework.buffers if self.session is not None else None

    # -- fit ------------------------------------------------------------------------------

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        session = self.session
        if session is None:
            return
        if self._guard.active:
            self._end_fit(failing=True)  # an earlier fit() that raised where no hook ran
        FitGuard.end_stale(self.model)
        self._framework.reset_start()
        wrap = session.policy.save_on_preemption
        self._guard.begin(self.model, wrap=wrap)
        try:
            point = session.begin(
                restore="own_run" if self._fits > 0 else "policy",  # a later fit(): the model in memory is newest
                is_current=lambda frame: self._guard.running(frame or sys._getframe()),
                on_stale=lambda: self._end_fit(failing=True),
            )
            if point is not None:
                session.restore_rng(point.state)
                epochs = (self.params or {}).get("epochs")
                session.note_complete(epochs if isinstance(epochs, int) else None)
        except BaseException:
            self._finish_fit()
            raise
        self._fits += 1
        self._warned_monitor = self._mode_settled = False
        self._epoch_batches = 0
        self._step = self._framework.read_step()
        self._sync_best()

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        super().on_epoch_begin(epoch, logs)
        self._epoch_batches = 0
        self._validated = False
        if self.session is not None:
            self.session.epoch_begin(epoch)

    def on_test_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        super().on_test_begin(logs)
        self._validated = True  # fit() validates through evaluate(), with its own callbacks

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        session = self.session
        if session is None:
            super().on_train_batch_end(batch, logs)
            return
        if session.engine is None or session.preempted:
            return
        batches = batch + 1 - self._epoch_batches  # `batch` is the last batch of this call (steps_per_execution)
        self._epoch_batches = batch + 1
        policy = session.policy
        if policy.every_n_steps is None and policy.every_n_minutes is None and not session.stop_requested():
            self._step += batches  # reading the optimizer's counter costs a device sync: only for a save
        else:
            self._step = self._framework.read_step()
        steps = self.params.get("steps") if self.params else None
        try:
            session.batch_end(
                self._step, batches=batches, last_batch=steps is not None and batch + 1 >= steps, metrics=logs or {}
            )
        finally:
            if session.preempted:
                self._finish_fit()  # the session ended: a SIGTERM, and a handler of the user's took it

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        session = self.session
        if session is None:
            super().on_epoch_end(epoch, logs)
            return
        if session.preempted:
            return  # stopped mid-epoch by SIGTERM: this epoch did not finish, its state is saved already
        steps = self.params.get("steps") if self.params else None
        if session.stop_requested() and self.model.stop_training and steps is not None and self._epoch_batches < steps:
            self._stop_for_preemption()  # another callback stopped this epoch early for the same SIGTERM
            return
        engine = session.engine
        if engine is not None and not self._mode_settled:
            # Compiled metrics are built by the first train step, so their direction is known only now.
            engine.policy = resolve_mode(engine.policy, self.model)
            self._mode_settled = True
        metrics = dict(logs or {})
        self._check_monitor(metrics)
        self._step = self._framework.read_step()
        committed = None
        if session.policy.async_save and engine is not None:
            engine.wait()  # the previous epoch's save, in the background: its error surfaces here
            committed = session.best_score()
            self.best = self._or_threshold(committed)
        previous_best = self.best
        # A new best to export is saved on this thread: the export follows its commit.
        synchronous = self._export and session.policy.async_save
        saved = session.epoch_end(
            epoch,
            self._step,
            metrics,
            adjust=self._apply_threshold,
            background=(lambda plan: not any(BEST in item.roles for item in plan.items)) if synchronous else None,
        )
        engine = session.engine
        assert engine is not None and engine.store is not None
        if saved.background:
            # The worker changes the engine's index while it commits: the best is settled before it starts.
            self.best = self._or_threshold(self._ranked_first(committed, saved.plan))
            paths = [(item.roles, engine.store.join(item.filename)) for item in saved.plan.items]
        else:
            paths = [(r.roles, engine.path_of(r)) for r in saved.records]
            self._sync_best()
        self._report(epoch, saved.plan, paths, previous_best)
        best = engine.best_record
        if self._export and engine.is_writer and best is not None and any(r.name == best.name for r in saved.records):
            self.export_path = export_best(self.model, engine, best) or self.export_path
        if session.stop_requested():
            self._stop_for_preemption()  # the signal came during this epoch's validation or save

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.session is not None:
            self._end_fit()  # waits for a background save: its error is the fit's

    def _check_monitor(self, metrics: Mapping[str, Any]) -> None:
        """Refuse a monitor that is never logged (a misspelling) before anything is named after it.

        A validation metric can be missing only because validation did not run this epoch (no
        validation_data, or validation_freq): then it warns once, as ModelCheckpoint does, and the
        last and snapshot checkpoints are still saved. Once metrics of its kind were logged without
        it, it never will be: fit() stops with a MonitorError that names the closest logged key.
        """
        session = self.session
        assert session is not None
        monitor = session.policy.monitor
        if monitor is None or metrics.get(monitor) is not None:
            return
        if self._validated or not monitor.startswith("val_"):
            try:
                session.check_monitor(metrics, strict=True)
            except MonitorError as exc:
                self._end_fit(failing=True)
                raise MonitorError(with_close_match(str(exc), monitor, metrics)) from None
        if not self._warned_monitor:
            self._warned_monitor = True
            logged = ", ".join(sorted(metrics)) or "none"
            warnings.warn(
                f"Can save best model only with {monitor} available. Logged metrics: {logged}. "
                "Validation did not run this epoch (no validation_data, or validation_freq); last and snapshot "
                "checkpoints are still saved.",
                stacklevel=3,
            )

    # -- the end of a fit -------------------------------------------------------------------

    def _stop_for_preemption(self) -> None:
        assert self.session is not None
        try:
            self.session.stop_for_preemption()
        finally:
            self._finish_fit()

    def _on_step_exception(self, exc: BaseException) -> None:
        """An exception escapes a training step, and so fit(): the session saves a training state, then ends."""
        assert self.session is not None
        try:
            self.session.on_exception(exc)
        finally:
            self._finish_fit()

    def _end_fit(self, failing: bool = False) -> None:
        self._finish_fit()
        if self.session is not None:
            self.session.end(failing=failing)

    def _finish_fit(self) -> None:
        """Put back what this callback replaced for the fit: train_function, model._initial_epoch."""
        self._guard.end()
        self._framework.reset_start()

    # -- helpers ------------------------------------------------------------------------

    def _apply_threshold(self, plan: Plan) -> Plan:
        """Drop the best role when the value does not beat `initial_value_threshold` (as ModelCheckpoint does)."""
        engine = self.engine
        policy = engine.policy if engine is not None else self._policy
        if self._threshold is None or policy is None or policy.monitor is None or not plan:
            return plan
        if is_better(plan.metrics.get(policy.monitor), float(self._threshold), policy.resolved_mode, policy.min_delta):
            return plan
        items = [replace(item, roles=item.roles - {BEST}) for item in plan.items if item.roles - {BEST}]
        return replace(plan, items=tuple(items))

    def _sync_best(self) -> None:
        """Keep Keras's `self.best` equal to the engine's best score (it survives restarts there)."""
        if self.session is not None and self.session.engine is not None:
            self.best = self._or_threshold(self.session.best_score())

    def _ranked_first(self, score: float | None, plan: Plan) -> float | None:
        """The best score once `plan` is committed: `score`, or the plan's value when it ranks first."""
        engine = self.engine
        monitor = engine.policy.monitor if engine is not None else None
        if engine is not None and monitor is not None and any(BEST in item.roles for item in plan.items):
            value = plan.metrics.get(monitor)
            if is_better(value, score, engine.policy.resolved_mode):
                return value
        return score

    def _or_threshold(self, score: float | None) -> Any:
        return score if score is not None else self._threshold

    def _report(self, epoch: int, plan: Plan, saved: list[tuple[frozenset[str], str]], previous_best: Any) -> None:
        """ModelCheckpoint's verbose messages, on the checkpoint_hooks logger."""
        engine = self.engine
        if engine is None or not engine.is_writer or not log.isEnabledFor(engine.level):
            return
        policy = engine.policy
        monitor = policy.monitor
        score = plan.metrics.get(monitor) if monitor else None
        if monitor is None or score is None:
            return
        before = "None" if previous_best is None else f"{float(previous_best):.5f}"
        ranked = [path for roles, path in saved if BEST in roles]
        reference = None if previous_best is None else float(previous_best)
        if not ranked:
            log.log(engine.level, "Epoch %d: %s did not improve from %s", epoch + 1, monitor, before)
        elif is_better(score, reference, policy.resolved_mode, policy.min_delta):
            log.log(engine.level, "Epoch %d: %s improved from %s to %.5f, saving model to %s",
                    epoch + 1, monitor, before, score, ranked[0])
        else:
            log.log(engine.level, "Epoch %d: %s=%.5f enters the top %s (best %s), saving model to %s",
                    epoch + 1, monitor, score, policy.top_k if policy.top_k > 0 else "all", before, ranked[0])


def with_close_match(message: str, monitor: str, metrics: Mapping[str, Any]) -> str:
    """`message`, ending with the logged key closest to `monitor`: a misspelling, or a short form such as
    `acc` for `accuracy` (the name Keras 2 logged), which is too short for a close match."""
    if "did you mean" in message:
        return message
    keys = sorted(str(key) for key in metrics)
    close = difflib.get_close_matches(monitor, keys, n=1, cutoff=0.6) or [k for k in keys if k.startswith(monitor)][:1]
    return f"{message}; did you mean {close[0]!r}?" if close else message
