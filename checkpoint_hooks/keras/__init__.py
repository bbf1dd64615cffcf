"""Keras 3 adapter: `BestCheckpoint`, a drop-in `keras.callbacks.ModelCheckpoint` driven by the shared policy.

Built from ModelCheckpoint's own arguments (a `filepath` and nothing else of
the policy) it is ModelCheckpoint: same files, same placeholders, same errors
and warnings, no resume, no pruning. Given policy fields, a `policy=`, or no
`filepath`, it hands every epoch end to the checkpoint engine: top-k best,
snapshots, a rolling last checkpoint, retention that survives restarts, and a
`fit()` that continues after a crash at the next epoch.

    model.fit(x, y, validation_data=(xv, yv), epochs=20,
              callbacks=[BestCheckpoint(monitor="val_loss", dirpath="ckpt", top_k=3)])

Mid-epoch saves. `every_n_steps` (optimizer steps; an integer `save_freq` means
the same in policy mode) and `every_n_minutes` save a training state inside an
epoch, named `last-epoch=E-step=S.keras`; it becomes the rolling last. Keras
cannot start an epoch at a given batch, so a run resumed from such a save
restarts epoch E from its first batch with the restored weights and optimizer
state: the batches of epoch E trained before the save are trained again, the
epochs end where an uninterrupted run ends, and the optimizer step count ends
higher by the number of repeated batches (a warning says how many).

Preemption (`save_on_preemption`, on by default). During fit() a SIGTERM only
sets a flag. At the next batch end (or epoch end) the callback saves a training
state tagged `preempted`, stops training, puts back the SIGTERM handler that was
there before fit() and raises the signal again, so the process ends as SIGTERM
would have ended it (or the user's own handler runs). An exception escaping a
training step (`model.train_function`, which the callback wraps for the length
of fit(); Ctrl-C during a step included) saves one too before it propagates.
Keras gives callbacks no hook for exceptions raised elsewhere (in another
callback, in validation): those end fit() without a save, and the next fit()
resumes from the last save before them. Under several processes
(multi-worker tf.distribute, multi-process JAX) only SIGTERM saves; each process
acts on its own signal and only the chief writes.

A resumable `.keras` file carries the epoch, the step and the RNG seed states
inside it, as one more member of its zip archive (`checkpoint_hooks.json`), which
`keras.saving.load_model` and `load_weights` pass over: every file beside it
would cost a hash and an fsync at each save.

`async_save=True`: at the epoch end the training thread only copies what the save
writes (the config, and every variable Keras's own saving walk visits) to host
memory; a background thread writes the `.keras` or `.weights.h5` file, hashes it,
fsyncs, commits and prunes while the next epoch trains (see
`checkpoint_hooks.keras.snapshot`; legacy `.h5` files are still written on the
training thread). The next save and the end of fit() wait for it, and its error
surfaces there. Saves on preemption, and saves of a new best model with
`export_best`, are synchronous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import keras
import numpy as np

from checkpoint_hooks.core import CheckpointError, CorruptCheckpointError, Engine, Record, SaveError, SaveItem
from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.engine import Plan
from checkpoint_hooks.core.preemption import SigtermWatch
from checkpoint_hooks.core.records import BEST
from checkpoint_hooks.core.retention import is_better
from checkpoint_hooks.core.store import STAGING_PREFIX, is_url
from checkpoint_hooks.keras import snapshot as keras_snapshot
from checkpoint_hooks.policy import (
    CheckpointPolicy,
    PolicyError,
    SnapshotPolicy,
    load_policy,
    metric_direction,
    template_fields,
)

log = logging.getLogger("checkpoint_hooks")

__all__ = ["BestCheckpoint"]

WEIGHTS_EXT = ".weights.h5"
KERAS_EXT = ".keras"
LEGACY_EXT = ".h5"
STATE_MEMBER = "checkpoint_hooks.json"  # in the zip of every resumable .keras: epoch, step, RNG seed states
STATE_SUFFIX = ".state.json"  # where version 1 wrote that state, beside the file (still read)
EXPORT_DIRNAME = "best_export"
EXPORT_INFO = "checkpoint_hooks.json"
_STATE_FORMAT = "checkpoint_hooks.keras"
_ORIGINAL = "_checkpoint_hooks_original"  # on a wrapped train_function: the function it wraps
_END_IF_STALE = "_checkpoint_hooks_end_if_stale"  # on a wrapped train_function: ends its fit session if over
# How a dataset of unknown length ends an epoch: not a failure.
_END_OF_DATA = ("StopIteration", "OutOfRangeError")


class _Default:
    """A ModelCheckpoint argument left at its default: a policy's own value takes its place."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _given(value: Any) -> bool:
    return not isinstance(value, _Default)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, _Default) else value


def _split_extension(name: str) -> tuple[str, str | None]:
    """`name` without a Keras extension, and that extension (weights before legacy: both end in .h5)."""
    for ext in (WEIGHTS_EXT, KERAS_EXT, LEGACY_EXT):
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return name, None


def _to_int(value: Any) -> int:
    # int() of a MirroredVariable raises; .numpy() works on every backend's variable.
    if hasattr(value, "numpy"):
        value = value.numpy()
    return int(np.asarray(value).item())


class BestCheckpoint(keras.callbacks.ModelCheckpoint):  # type: ignore[misc]
    """ModelCheckpoint with top-k retention, snapshots, a rolling last checkpoint and automatic resume.

    Drop-in mode: given `filepath` and only ModelCheckpoint's arguments, it does
    exactly what `keras.callbacks.ModelCheckpoint` does. Policy mode: switched on
    by leaving `filepath` out, by `policy=`, or by any argument after the `*`.
    A `filepath` in policy mode gives dirpath, filename and extension.

    Args:
        filepath: ModelCheckpoint's path template (`{epoch}`, `{batch}`, metric placeholders);
            optional in policy mode.
        monitor: the logged metric to rank checkpoints by (`"val_loss"` unless a policy says otherwise).
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
            or a path to a checkpoint to continue from.
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
        export_best: also export the best model as a TensorFlow SavedModel in
            `<dirpath>/best_export/` (for serving; `keras.layers.TFSMLayer` loads it).
    """

    def __init__(
        self,
        filepath: str | os.PathLike[str] | None = None,
        monitor: str | None = _Default("val_loss"),  # type: ignore[assignment]
        verbose: int = _Default(0),  # type: ignore[assignment]
        save_best_only: bool = _Default(False),  # type: ignore[assignment]
        save_weights_only: bool = _Default(False),  # type: ignore[assignment]
        mode: str = _Default("auto"),  # type: ignore[assignment]
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
        export_best: bool = False,
    ) -> None:
        policy_fields = {
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
        }
        self._policy_mode = (
            filepath is None or policy is not None or export_best or any(v is not None for v in policy_fields.values())
        )
        mode_value = _plain(mode)
        if mode_value not in ("auto", "min", "max"):
            # ModelCheckpoint's own wording, so tests written against it keep matching.
            warnings.warn(f"ModelCheckpoint mode '{mode_value}' is unknown, fallback to auto mode.", stacklevel=2)
            mode_value = "auto"
        weights_only = bool(_plain(save_weights_only))
        if filepath is None:
            # ModelCheckpoint validates a path; one with the right extension stands in for the policy's names.
            check_path: str | os.PathLike[str] = "checkpoint" + (WEIGHTS_EXT if weights_only else KERAS_EXT)
        else:
            check_path = filepath
        super().__init__(
            check_path,
            monitor=_plain(monitor),
            verbose=_plain(verbose),
            save_best_only=_plain(save_best_only),
            save_weights_only=weights_only,
            mode=mode_value,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        self._threshold = initial_value_threshold
        self._policy: CheckpointPolicy | None = None
        self._extensions: dict[str, str] = {"weights": WEIGHTS_EXT, "model": KERAS_EXT, "training_state": KERAS_EXT}
        self._resumable: frozenset[str] = frozenset({"model", "training_state"})
        self._host_buffers: HostBuffers[np.ndarray] = HostBuffers(np.empty)  # what background saves copy the state into
        self._export = bool(export_best)
        self._engine: Engine | None = None
        self._fits = 0
        self._run: str | None = None
        self._moved_initial_epoch = False
        self._warned_monitor = False
        self._mode_settled = False
        self._saving: tuple[int, int] = (0, 0)
        self.export_path: str | None = None
        # One fit() in policy mode: where it runs, what it replaced, what happened in it.
        self._fit_frame: FrameType | None = None
        self._in_fit = False
        self._epoch = 0
        self._batches = 0
        self._epoch_batches = 0
        self._last_step = 0
        self._last_logs: Mapping[str, Any] = {}
        self._watch = SigtermWatch(
            on_signal=self._note_sigterm,
            is_current=lambda frame: self._fit_running(frame or sys._getframe()),
            on_stale=self._end_session,
        )
        self._wrapper: Callable[..., Any] | None = None
        self._wrapped_model: Any = None
        self._sigterm = False
        self._preempted = False
        if not self._policy_mode:
            return

        if not isinstance(save_freq, str):
            # ModelCheckpoint let only ints through; in policy mode they count optimizer steps.
            if isinstance(save_freq, bool) or save_freq < 1:
                raise PolicyError(
                    f"save_freq must be 'epoch' or a positive number of batches. Received: save_freq={save_freq!r}"
                )
            if every_n_steps is not None and every_n_steps != save_freq:
                raise PolicyError(
                    "save_freq=N and every_n_steps=N ask for the same thing (a training state every N steps); "
                    f"give one of them. Received: save_freq={save_freq!r}, every_n_steps={every_n_steps!r}"
                )
            policy_fields["every_n_steps"] = save_freq
        overrides = {k: v for k, v in policy_fields.items() if v is not None}
        base = load_policy(policy) if policy is not None else None
        if base is None or _given(monitor):
            overrides["monitor"] = _plain(monitor)
        if base is None or _given(mode):
            overrides["mode"] = mode_value
        if _given(save_best_only):
            overrides["save_best_only"] = bool(save_best_only)
        if _given(verbose):
            overrides["verbose"] = bool(verbose)
        implied_ext: str | None = None
        if filepath is not None:
            for name in ("dirpath", "filename"):
                if policy_fields[name] is not None:
                    raise PolicyError(
                        f"give either filepath or {name}, not both: filepath names the directory and the file. "
                        f"Received: filepath={os.fspath(filepath)!r}, {name}={policy_fields[name]!r}"
                    )
            head, tail = os.path.split(str(os.fspath(filepath)))
            stem, implied_ext = _split_extension(tail)
            overrides["dirpath"] = head or "."
            overrides["filename"] = stem
        policy_obj = load_policy(base, **overrides)
        if policy_obj.filename is not None and implied_ext is None:
            stem, implied_ext = _split_extension(policy_obj.filename)
            if implied_ext is not None:
                policy_obj = load_policy(policy_obj, filename=stem)
        policy_obj = self._settle_format(policy_obj, implied_ext, weights_only)
        if policy_obj.filename is not None and any(
            name == "batch" for name, _spec in template_fields(policy_obj.filename)
        ):
            raise PolicyError(
                "the {batch} placeholder has no value in policy mode: its checkpoints are named at epoch ends "
                "(mid-epoch saves are named last-epoch=E-step=S); use {step}, or drop the policy fields. "
                f"Received: filename={policy_obj.filename!r}"
            )
        if self._export and is_url(policy_obj.dirpath):
            raise PolicyError(
                "export_best writes a SavedModel directory and needs a local dirpath; export from a local "
                f"directory and copy it. Received: dirpath={policy_obj.dirpath!r}"
            )
        self._policy = policy_obj
        if filepath is None:
            self.filepath = None
        self.monitor = policy_obj.monitor
        self.mode = policy_obj.mode
        self.min_delta = policy_obj.min_delta
        self.save_best_only = policy_obj.save_best_only
        self.save_weights_only = (policy_obj.format or "model") == "weights"
        self.verbose = int(policy_obj.verbose) if not _given(verbose) else _plain(verbose)

    def _settle_format(self, policy: CheckpointPolicy, ext: str | None, weights_only: bool) -> CheckpointPolicy:
        """The format the file extension, `save_weights_only` and `format` agree on; sets the model extension."""
        fmt = policy.format
        named = f"a name ending in {ext!r}" if ext else "no extension"
        if weights_only:
            if fmt not in (None, "weights"):
                raise PolicyError(
                    "save_weights_only=True saves .weights.h5 files, which contradicts the format; drop one of the "
                    f"two. Received: save_weights_only=True, format={fmt!r}"
                )
            fmt = "weights"
        if ext == WEIGHTS_EXT and fmt not in (None, "weights"):
            raise PolicyError(
                f"a .weights.h5 file holds weights only; use format='weights' or a '.keras' name. "
                f"Received: {named}, format={fmt!r}"
            )
        if ext in (KERAS_EXT, LEGACY_EXT) and fmt == "weights":
            raise PolicyError(
                f"format='weights' writes .weights.h5 files; name the file '*.weights.h5' or drop format. "
                f"Received: {named}, format='weights'"
            )
        if ext == LEGACY_EXT and fmt == "training_state":
            raise PolicyError(
                "format='training_state' needs the native .keras format (legacy .h5 files do not restore the "
                f"optimizer); name the file '*.keras' or use format='model'. Received: {named}, format='training_state'"
            )
        if ext == WEIGHTS_EXT:
            fmt = "weights"
        elif ext == LEGACY_EXT:
            fmt = "model"
            # Legacy HDF5 files do not bring the optimizer back, so the rolling last is a separate .keras.
            self._extensions["model"] = LEGACY_EXT
            self._resumable = frozenset({"training_state"})
        if fmt != policy.format:
            policy = load_policy(policy, format=fmt)
        return policy

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
        return self._engine

    @property
    def best_model_path(self) -> str:
        return self._engine.best_model_path if self._engine is not None else ""

    @property
    def best_model_score(self) -> float | None:
        return self._engine.best_model_score if self._engine is not None else None

    @property
    def last_model_path(self) -> str:
        return self._engine.last_model_path if self._engine is not None else ""

    @property
    def preempted(self) -> bool:
        """True once a SIGTERM (or a failing training step) stopped the current or latest fit().

        After a SIGTERM it turns True at once; the training state tagged `preempted` follows at the
        next batch end.
        """
        return self._sigterm or self._preempted

    # -- fit start ------------------------------------------------------------------------

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if not self._policy_mode:
            return
        self._end_stale_sessions()
        self._reset_initial_epoch()
        self._close()  # an earlier fit() that raised: its background save's error is logged
        assert self._policy is not None
        engine = Engine(
            self._policy,
            extensions=self._extensions,
            default_format="model",
            resumable_formats=self._resumable,
            epoch_base=1,  # Keras numbers epochs from 1 in names and messages
            is_writer=self._is_writer(),
        )
        self._engine = engine
        self._warned_monitor = False
        self._mode_settled = False
        try:
            self._begin(engine)
        except BaseException:
            self._reset_initial_epoch()
            self._close()
            raise
        self._fits += 1
        if engine.is_writer:
            self._run = engine.run
        self._sync_best()
        self._begin_session(engine)

    def _begin(self, engine: Engine) -> None:
        resume = engine.policy.resume
        if self._fits > 0:
            # A later fit() of this callback continues its own run: the model in memory is the newest state.
            engine.start()
            if engine.is_writer and self._run and engine.run != self._run:
                own = engine.manifest.run_records(self._run)
                if own:
                    engine.adopt(own[-1], discard_newer=False)
            return
        if resume not in ("auto", "never"):
            engine.start()
            self._resume_from_path(engine, resume)
            return
        record = engine.start()  # on other workers: the writer's resume point, read without the lock
        if record is not None:
            self._restore(engine.local_path(record), record.epoch, record.name, record.mid_epoch)

    def _resume_from_path(self, engine: Engine, path: str) -> None:
        record = engine.find_record(path) if engine.is_writer else None
        if record is not None:
            problems = engine.problems(record)
            if problems:
                raise CorruptCheckpointError(
                    f"resume={path!r} does not verify: {'; '.join(str(p) for p in problems)}; "
                    "resume from another checkpoint or set resume='never'"
                )
            engine.adopt(record, discard_newer=False)
            self._restore(engine.local_path(record), record.epoch, record.name, record.mid_epoch)
            return
        if not os.path.exists(path):
            raise PolicyError(
                f"resume must be 'auto', 'never' or an existing checkpoint file; {path!r} does not exist. "
                f"Received: resume={path!r}"
            )
        state = _read_state(path)
        epoch = state.get("epoch")
        self._restore(path, epoch if isinstance(epoch, int) else None, path, bool(state.get("mid_epoch", False)))

    def _restore(self, path: str, epoch: int | None, label: str, mid_epoch: bool = False) -> None:
        """Load weights, optimizer state and RNG seed states in place, and tell fit() where to start.

        Args:
            path: the checkpoint file.
            epoch: the 0-based epoch it was saved in (None: unknown).
            label: how log messages name it.
            mid_epoch: whether it was saved before that epoch finished.
        """
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            # An unbuilt optimizer skips its saved variables with only a warning (iterations stay 0).
            with _strategy_scope(model):
                optimizer.build(model.trainable_variables)
        try:
            model.load_weights(path)
        except Exception as exc:
            raise CheckpointError(
                f"could not load {path} into this model ({type(exc).__name__}: {exc}); the model differs from the "
                "one that saved it. Start fresh with resume='never' or another dirpath"
            ) from exc
        state = _read_state(path)
        seeds = _seed_variables(model)
        saved = state.get("seed_states")
        if isinstance(saved, list) and len(saved) == len(seeds):
            for variable, values in zip(seeds, saved):
                variable.assign(np.asarray(values, dtype=variable.dtype))
        elif seeds and saved is not None:
            log.warning(
                "%s holds %s seed states, the model has %d; dropout will not repeat the interrupted run exactly",
                label,
                len(saved) if isinstance(saved, list) else "no",
                len(seeds),
            )
        _set_backend_rng_state(state)
        if epoch is not None and mid_epoch:
            # Keras cannot skip the batches this epoch saw before the save: the epoch starts over.
            model._initial_epoch = epoch
            self._moved_initial_epoch = True
            seen = state.get("epoch_batches")
            log.warning(
                "resumed from %s, saved during epoch %d at step %s; Keras cannot skip batches, so epoch %d "
                "starts over from its first batch with the restored weights: the %s it trained before the save "
                "are trained again and the optimizer step count ends that much higher",
                label,
                epoch + 1,
                state.get("step", "?"),
                epoch + 1,
                f"{seen} batch(es)" if isinstance(seen, int) else "batches",
            )
        elif epoch is not None:
            model._initial_epoch = epoch + 1
            self._moved_initial_epoch = True
            log.info("resumed from %s (epoch %d); training continues at epoch %d", label, epoch + 1, epoch + 2)
        else:
            log.info("loaded %s; its epoch is unknown, so training starts at fit()'s initial_epoch", label)

    def _resolved_policy(self) -> CheckpointPolicy:
        """The policy, with mode='auto' settled by the Keras metric's own direction when the name does not tell."""
        policy = self._policy
        assert policy is not None
        monitor = policy.monitor
        if monitor is None or policy.mode != "auto" or metric_direction(monitor) is not None:
            return policy
        direction = _keras_direction(self.model, monitor)
        if direction is None:
            return policy
        return load_policy(policy, mode="max" if direction == "up" else "min")

    def _is_writer(self) -> bool:
        """Only the chief writes: every worker writing the same path is a known TensorFlow complaint."""
        strategy = getattr(self.model, "distribute_strategy", None)
        if strategy is not None:
            return bool(getattr(strategy.extended, "should_checkpoint", True))
        if keras.backend.backend() == "jax":
            with contextlib.suppress(Exception):
                from keras.src.backend.jax import distribution_lib

                return int(distribution_lib.process_id()) == 0
        return True

    # -- batch end: step and time triggers, preemption ---------------------------------

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch
        self._epoch_batches = 0

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._policy_mode:
            super().on_train_batch_end(batch, logs)
            return
        engine = self._engine
        if engine is None or self._preempted:
            return
        self._batches += 1
        self._epoch_batches = batch + 1  # `batch` is the last batch index of this call (steps_per_execution)
        self._last_logs = logs or {}
        if self._sigterm:
            self._stop_for_preemption(mid_epoch=True)
            return
        policy = engine.policy
        if policy.every_n_steps is None and policy.every_n_minutes is None:
            return
        step = self._step()
        previous, self._last_step = self._last_step, step
        steps = self.params.get("steps") if self.params else None
        if policy.last and steps is not None and batch + 1 >= steps:
            return  # the epoch end that follows saves a rolling last anyway
        every = policy.every_n_steps
        # With steps_per_execution > 1 the step moves by more than one between calls: a multiple crossed counts.
        by_steps = every is not None and step // every > previous // every and engine.step_due(step - step % every)
        if by_steps or engine.time_due():
            self._save_training_state(mid_epoch=True, preempted=False)

    def _step(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        return _to_int(optimizer.iterations) if optimizer is not None else 0

    def _save_training_state(self, *, mid_epoch: bool, preempted: bool) -> None:
        """A training state outside the epoch-end rules; it becomes the rolling last (the resume point).

        A save on preemption is synchronous (on disk before the process ends), and a background
        save that failed before it is logged rather than keeping it from being made.
        """
        engine = self._engine
        assert engine is not None
        if preempted:
            try:
                engine.wait()
            except Exception as exc:
                log.error("%s", exc)
        step = self._step()
        plan = engine.plan_training_state(self._epoch, step, self._last_logs, mid_epoch=mid_epoch, preempted=preempted)
        self._saving = (self._epoch, step)
        if engine.policy.async_save and not preempted:
            self._execute_in_background(engine, plan)
        else:
            engine.execute(plan, self._write)

    def _stop_for_preemption(self, *, mid_epoch: bool) -> None:
        """Save a preempted training state, stop training, then let SIGTERM end the process as it would have."""
        self._sigterm = False
        self._preempted = True
        self.model.stop_training = True
        log.warning("SIGTERM received; saving a training state to resume from before the process ends")
        error: Exception | None = None
        try:
            self._save_training_state(mid_epoch=mid_epoch, preempted=True)
        except Exception as exc:
            error = exc
            log.error("could not save a training state on SIGTERM: %s", exc)
        finally:
            self._end_session()
        signal.raise_signal(signal.SIGTERM)
        # Still here: a handler of the user's took the signal and returned; fit() stops after this epoch.
        if error is not None:
            raise error

    # -- epoch end --------------------------------------------------------------------

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._policy_mode:
            super().on_epoch_end(epoch, logs)
            return
        if self._preempted:
            return  # stopped mid-epoch by SIGTERM: this epoch did not finish, its state is saved already
        engine = self._engine
        if engine is None:
            raise CheckpointError("BestCheckpoint.on_epoch_end ran before on_train_begin; pass the callback to fit()")
        steps = self.params.get("steps") if self.params else None
        if self._sigterm and self.model.stop_training and steps is not None and self._epoch_batches < steps:
            # Another callback stopped this epoch early for the same SIGTERM (a second BestCheckpoint, say).
            self._stop_for_preemption(mid_epoch=True)
            return
        if not self._mode_settled:
            # Compiled metrics are built by the first train step, so their direction is known only now.
            engine.policy = self._resolved_policy()
            self._mode_settled = True
        metrics = dict(logs or {})
        monitor = engine.policy.monitor
        if monitor is not None and metrics.get(monitor) is None and not self._warned_monitor:
            self._warned_monitor = True
            logged = ", ".join(sorted(metrics)) or "none"
            warnings.warn(
                f"Can save best model only with {monitor} available. Logged metrics: {logged}. "
                "Last and snapshot checkpoints are still saved; set monitor to one of the logged metrics.",
                stacklevel=2,
            )
        step = _to_int(self.model.optimizer.iterations) if getattr(self.model, "optimizer", None) is not None else 0
        committed = None
        if engine.policy.async_save:
            engine.wait()  # the previous epoch's save, in the background: its error surfaces here
            committed = self._committed_best()
            self.best = self._or_threshold(committed)
        previous_best = self.best
        plan = self._apply_threshold(engine.plan(epoch, step, metrics))
        self._saving = (epoch, step)
        records: list[Record] = []
        if engine.policy.async_save and not (self._export and any(BEST in item.roles for item in plan.items)):
            # The worker changes the engine's index while it commits: the best is settled before it starts.
            best_after = self._or_threshold(self._ranked_first(committed, plan))
            self._execute_in_background(engine, plan)
            assert engine.store is not None
            saved = [(item.roles, engine.store.join(item.filename)) for item in plan.items]
            self.best = best_after
        else:
            records = engine.execute(plan, self._write)
            saved = [(r.roles, engine.path_of(r)) for r in records]
            self._sync_best()
        self._report(epoch, plan, saved, previous_best)
        best = engine.best_record
        if self._export and engine.is_writer and best is not None and any(r.name == best.name for r in records):
            self._export_best(engine, best)
        if self._sigterm:
            # The signal came during this epoch's validation or save: the epoch is complete.
            self._last_logs = metrics
            self._stop_for_preemption(mid_epoch=False)

    def _apply_threshold(self, plan: Plan) -> Plan:
        """Drop the best role when the value does not beat `initial_value_threshold` (as ModelCheckpoint does)."""
        policy = self._engine.policy if self._engine is not None else self._policy
        if self._threshold is None or policy is None or policy.monitor is None or not plan:
            return plan
        score = plan.metrics.get(policy.monitor)
        if is_better(score, float(self._threshold), policy.resolved_mode, policy.min_delta):
            return plan
        items = []
        for item in plan.items:
            roles = item.roles - {BEST}
            if roles:
                items.append(dataclasses.replace(item, roles=roles))
        return dataclasses.replace(plan, items=tuple(items))

    def _write(self, item: SaveItem, path: str) -> None:
        """Save one item in its format; resumable ones get the epoch, step and seed states beside them."""
        model = self.model
        if item.format == "weights":
            model.save_weights(path, overwrite=True)
        elif path.endswith(LEGACY_EXT):
            # Legacy HDF5 saving pops "optimizer" from the model's compile config, so every later
            # .keras file would load with a default optimizer; keep the config as it was.
            compile_config = getattr(model, "_compile_config", None)
            config = getattr(compile_config, "config", None)
            kept = dict(config) if isinstance(config, dict) else None
            try:
                model.save(path, overwrite=True)
            finally:
                if compile_config is not None and kept is not None:
                    compile_config.config = kept
        else:
            model.save(path, overwrite=True)
        if keras_snapshot.available():
            keras_snapshot.keep_skipsets()  # the next save skips rebuilding them (a Keras defect, see there)
        if item.format in self._resumable:
            # One more member of the .keras zip (its central directory is rewritten after it), not one more file.
            with zipfile.ZipFile(path, "a") as archive:
                archive.writestr(STATE_MEMBER, self._resume_state(item))

    def _resume_state(self, item: SaveItem) -> str:
        """The `checkpoint_hooks.json` member of a resumable .keras: epoch, step and random states, as of now."""
        epoch, step = self._saving
        state = {
            "format": _STATE_FORMAT,
            "epoch": epoch,
            "step": step,
            "mid_epoch": item.mid_epoch,
            **({"epoch_batches": self._epoch_batches} if item.mid_epoch else {}),
            "seed_states": [np.asarray(v.numpy()).tolist() for v in _seed_variables(self.model)],
            **_backend_rng_state(),
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
        }
        return json.dumps(state)

    def _execute_in_background(self, engine: Engine, plan: Plan) -> None:
        """async_save: copy the state to host memory here; the worker writes the files and commits them.

        Legacy .h5 files, or a Keras without the saving functions a snapshot reuses, are
        written here instead, and only their hashing, fsync and commit run in the worker.
        """
        if keras_snapshot.available() and not any(self._extensions[item.format] == LEGACY_EXT for item in plan.items):
            engine.execute_async(plan, self._snapshot, lambda item, snapshot, path: snapshot.write(path), self._host_buffers)
        else:
            engine.execute(plan, self._write, background=True)

    def _snapshot(self, item: SaveItem) -> keras_snapshot.Snapshot:
        """What `_write` writes for `item`, held in memory."""
        snapshot = keras_snapshot.take(self.model, archive=item.format != "weights", buffers=self._host_buffers)
        if item.format in self._resumable:
            snapshot.members[STATE_MEMBER] = self._resume_state(item).encode()
        return snapshot

    def _report(self, epoch: int, plan: Plan, saved: list[tuple[frozenset[str], str]], previous_best: Any) -> None:
        """ModelCheckpoint's verbose messages, on the checkpoint_hooks logger."""
        engine = self._engine
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
        args: tuple[Any, ...]
        if ranked and is_better(score, reference, policy.resolved_mode, policy.min_delta):
            message, args = "Epoch %d: %s improved from %s to %.5f, saving model to %s", (before, score)
        elif ranked:
            message, args = (
                "Epoch %d: %s=%.5f enters the top %s (best %s), saving model to %s",
                (
                    score,
                    policy.top_k if policy.top_k > 0 else "all",
                    before,
                ),
            )
        else:
            log.log(engine.level, "Epoch %d: %s did not improve from %s", epoch + 1, monitor, before)
            return
        log.log(engine.level, message, epoch + 1, monitor, *args, ranked[0])

    def _export_best(self, engine: Engine, record: Record) -> None:
        """Export the best model as a SavedModel: into a staging folder, then renamed into place."""
        assert engine.store is not None
        root = engine.store.join("")
        target = os.path.join(root, EXPORT_DIRNAME)
        token = uuid.uuid4().hex[:12]
        # The staging prefix lets the engine's start-up cleanup remove what an interrupted export left.
        staged = os.path.join(root, f"{STAGING_PREFIX}export-{token}")
        retired = os.path.join(root, f"{STAGING_PREFIX}retired-export-{token}")
        try:
            self.model.export(staged, format="tf_saved_model", verbose=False)
            info = {
                "record": record.name,
                "checkpoint": record.primary_path,
                "epoch": record.epoch + 1,
                "step": record.step,
                "metrics": dict(record.metrics),
            }
            with open(os.path.join(staged, EXPORT_INFO), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=1)
            if os.path.exists(target):
                os.replace(target, retired)
            os.replace(staged, target)
        except Exception as exc:
            shutil.rmtree(staged, ignore_errors=True)
            if os.path.exists(retired) and not os.path.exists(target):
                os.replace(retired, target)
            message = f"could not export the best model ({record.name}) to {target}: {type(exc).__name__}: {exc}"
            if engine.policy.on_save_error == "warn":
                log.warning("%s; training goes on (on_save_error='warn')", message)
                return
            raise SaveError(message) from exc
        shutil.rmtree(retired, ignore_errors=True)
        self.export_path = target
        log.log(engine.level, "exported the best model (%s) to %s", record.name, target)

    def _sync_best(self) -> None:
        """Keep Keras's `self.best` equal to the engine's best score (it survives restarts there)."""
        if self._engine is not None:
            self.best = self._or_threshold(self._committed_best())

    def _committed_best(self) -> float | None:
        engine = self._engine
        record = engine.best_record if engine is not None else None
        return record.score(engine.policy.monitor) if engine is not None and record is not None else None

    def _ranked_first(self, score: float | None, plan: Plan) -> float | None:
        """The best score once `plan` is committed: `score`, or the plan's value when it ranks first."""
        engine = self._engine
        monitor = engine.policy.monitor if engine is not None else None
        if engine is not None and monitor is not None and any(BEST in item.roles for item in plan.items):
            value = plan.metrics.get(monitor)
            if is_better(value, score, engine.policy.resolved_mode):
                return value
        return score

    def _or_threshold(self, score: float | None) -> Any:
        return score if score is not None else self._threshold

    # -- fit end ----------------------------------------------------------------------

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if not self._policy_mode:
            return
        sigterm = self._sigterm
        error: Exception | None = None
        try:
            self._end_session(raise_errors=True)  # waits for a background save: its error is the fit's
        except Exception as exc:
            error = exc
        if sigterm:
            # The signal came after the last epoch's save: nothing is left to save, but it still ends the process.
            self._sigterm = False
            self._preempted = True
            if error is not None:
                log.error("%s", error)
            signal.raise_signal(signal.SIGTERM)
        if error is not None:
            raise error

    # -- one fit(): SIGTERM handler and train_function wrapper --------------------------

    def _begin_session(self, engine: Engine) -> None:
        """Start watching this fit() for SIGTERM and for exceptions escaping a training step."""
        self._in_fit = True
        self._batches = 0
        self._epoch_batches = 0
        self._last_step = self._step()
        self._last_logs = {}
        self._sigterm = False
        self._preempted = False
        if not engine.policy.save_on_preemption:
            return
        self._fit_frame = self._find_fit_frame()
        self._watch.install()
        self._wrap_train_function()

    def _end_session(self, raise_errors: bool = False) -> None:
        """Put back what this fit() replaced and release the directory; safe to call more than once.

        A background save still running is waited for; its error is raised with `raise_errors`
        (the fit's end), else logged (an exception or a signal is ending the fit already).
        """
        self._watch.restore()
        self._unwrap_train_function()
        self._fit_frame = None
        self._in_fit = False
        self._reset_initial_epoch()
        self._close(raise_errors)

    def _end_stale_sessions(self) -> None:
        """End what an earlier fit() left behind when an exception skipped its on_train_end."""
        if self._in_fit:
            self._end_session()
        model = self.model
        function = getattr(model, "train_function", None) if model is not None else None
        # Another BestCheckpoint of this fit() may have wrapped it already: that one is alive and stays.
        while callable(getattr(function, _END_IF_STALE, None)) and getattr(function, _END_IF_STALE)():
            # Its owner put its SIGTERM handler back, released its lock and unwrapped it.
            following = getattr(model, "train_function", None)
            if following is function:
                break
            function = following

    def _find_fit_frame(self) -> FrameType | None:
        """The frame of the model's fit() that called on_train_begin; None outside Model.fit."""
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is self.model:
                return frame
            frame = frame.f_back
        return None

    def _fit_running(self, frame: FrameType | None) -> bool:
        """Whether this session's fit() is on the stack below `frame` (an exception may have ended it unseen)."""
        if not self._in_fit:
            return False
        if self._fit_frame is None:
            return True  # callbacks driven by hand: on_train_end is the only end there is
        while frame is not None:
            if frame is self._fit_frame:
                return True
            frame = frame.f_back
        return False

    def _note_sigterm(self) -> None:
        self._sigterm = True  # acted on at the next batch end, where the state is consistent

    def _wrap_train_function(self) -> None:
        """Wrap model.train_function for this fit(): an exception escaping a step saves a training state first."""
        model = self.model
        original = getattr(model, "train_function", None)
        if original is None or self._fit_frame is None:
            return

        def train_function(*args: Any, **kwargs: Any) -> Any:
            if not alive(sys._getframe(1)):
                # Left on the model by a fit() that ended unseen: train_on_batch, a later fit() without us.
                end()
                return original(*args, **kwargs)
            try:
                return original(*args, **kwargs)
            except BaseException as exc:
                if type(exc).__name__ not in _END_OF_DATA:
                    self._on_step_exception(exc)
                raise

        def alive(frame: FrameType | None) -> bool:
            return self._wrapper is train_function and self._fit_running(frame)

        def end() -> None:
            if self._wrapper is train_function:
                self._end_session()
            if getattr(model, "train_function", None) is train_function:
                model.train_function = original

        def end_if_stale() -> bool:
            if alive(sys._getframe()):
                return False
            end()
            return True

        setattr(train_function, _ORIGINAL, original)
        setattr(train_function, _END_IF_STALE, end_if_stale)
        model.train_function = train_function
        self._wrapper = train_function
        self._wrapped_model = model

    def _unwrap_train_function(self) -> None:
        wrapper, self._wrapper = self._wrapper, None
        model, self._wrapped_model = self._wrapped_model, None
        if wrapper is not None and getattr(model, "train_function", None) is wrapper:
            model.train_function = getattr(wrapper, _ORIGINAL)

    def _on_step_exception(self, exc: BaseException) -> None:
        """An exception escapes a training step, and so fit(): save a preempted training state, then clean up."""
        try:
            engine = self._engine
            if (
                engine is None
                or self._batches == 0  # nothing trained in this fit() that is not saved already
                or self._preempted
                or isinstance(exc, (CheckpointError, PolicyError))
                or _multi_process(self.model)  # the others would wait for this process; SIGTERM reaches them all
            ):
                return
            log.warning("%s stopped training; saving a training state to resume from", type(exc).__name__)
            self._preempted = True
            try:
                self._save_training_state(mid_epoch=True, preempted=True)
            except Exception as error:  # the training step's exception is the one to see
                log.error("could not save a training state after %s: %s", type(exc).__name__, error)
        finally:
            self._end_session()

    def _reset_initial_epoch(self) -> None:
        # fit() keeps reading model._initial_epoch on every later call; leave it as we found it.
        if self._moved_initial_epoch and self.model is not None:
            self.model._initial_epoch = None
        self._moved_initial_epoch = False

    def _close(self, raise_errors: bool = False) -> None:
        if self._engine is None:
            return
        try:
            self._engine.close()
        except Exception as exc:
            if raise_errors:
                raise
            log.error("%s", exc)


def _multi_process(model: Any) -> bool:
    """Whether training spans several processes (multi-worker tf.distribute, multi-process JAX)."""
    extended = getattr(getattr(model, "distribute_strategy", None), "extended", None)
    in_multi_worker: Callable[[], bool] | None = getattr(extended, "_in_multi_worker_mode", None)
    if in_multi_worker is not None:
        with contextlib.suppress(Exception):
            if in_multi_worker():
                return True
    if keras.backend.backend() == "jax":
        with contextlib.suppress(Exception):
            from keras.src.backend.jax import distribution_lib

            return int(distribution_lib.num_processes()) > 1
    return False


def _read_state(path: str) -> dict[str, Any]:
    """The state a resumable checkpoint holds (or version 1 wrote beside it); {} when there is none."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read(STATE_MEMBER))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        try:
            with open(path + STATE_SUFFIX, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
    return data if isinstance(data, dict) and data.get("format") == _STATE_FORMAT else {}


def _seed_variables(model: Any) -> list[Any]:
    """The state variables of every SeedGenerator (dropout, noise layers); `.keras` files do not hold them."""
    found = []
    for layer in model._flatten_layers():
        for generator in getattr(layer, "_seed_generators", ()):
            found.append(generator.state)
    return found


def _backend_rng_state() -> dict[str, Any]:
    """The torch backend's global generator: unseeded Dropout draws from it instead of a SeedGenerator."""
    torch = sys.modules.get("torch") if keras.backend.backend() == "torch" else None
    if torch is None:
        return {}
    state: dict[str, Any] = {"torch_rng_state": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda_rng_states"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_backend_rng_state(state: Mapping[str, Any]) -> None:
    torch = sys.modules.get("torch") if keras.backend.backend() == "torch" else None
    if torch is None or "torch_rng_state" not in state:
        return
    torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
    cuda_states = state.get("torch_cuda_rng_states")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda_states])


def _keras_direction(model: Any, monitor: str) -> str | None:
    """ "up" or "down" from the compiled Keras metric named by `monitor`, if it says."""
    name = monitor.removeprefix("val_")
    for metric in getattr(model, "metrics", ()) or ():
        for candidate in [metric, *(getattr(metric, "metrics", None) or ())]:
            if getattr(candidate, "name", None) == name and getattr(candidate, "_direction", None) in ("up", "down"):
                return str(candidate._direction)
    return None


@contextlib.contextmanager
def _strategy_scope(model: Any) -> Iterator[None]:
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        yield
        return
    with strategy.scope():
        yield
