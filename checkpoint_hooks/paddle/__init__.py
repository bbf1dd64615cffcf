"""`BestCheckpoint` for PaddlePaddle's high-level API (`paddle.Model.fit`).

    model.fit(train, eval_data, epochs=10, callbacks=[BestCheckpoint(monitor="val_loss")])

Paddle's own arguments work as they do for `paddle.callbacks.ModelCheckpoint(save_freq, save_dir)`:
`BestCheckpoint(1, "ckpt")` or `BestCheckpoint(save_freq=1, save_dir="ckpt")`. `save_dir` is
`dirpath`; `save_freq=N` adds a snapshot every N epochs (epochs N, 2N, ... counted from 1)
outside the top-k rotation. A BestCheckpoint without a directory of its own (no `dirpath`,
`save_dir` or policy `dirpath`) writes where `fit(save_dir=...)` says, and then a `fit(save_freq=N)`
other than 1 asks for snapshots every N epochs unless it has its own; with a directory of its
own, a different `fit(save_dir=...)` is ignored with a warning. hapi adds no ModelCheckpoint of
its own next to it.

Names: `paddle.Model.load(prefix)` takes what follows a dot for a file extension, so the default
names write a number's decimal point as `_` (`epoch=011-val_loss=0_1702`, loaded with
`Model.load("ckpt/epoch=011-val_loss=0_1702")`); a `filename` template that makes a dot is refused
(see `arguments`). Directories written with dotted names still resume.

Metric names: hapi logs evaluation values under the training names (`loss`,
`acc`, ...). Here the training values keep their names and the evaluation
values of the same epoch get a `val_` prefix, so `monitor="val_loss"` ranks by
the evaluation loss and `monitor="loss"` by the training loss. Both losses are
the epoch's mean over batches weighted by batch size (hapi's own logs carry
only the last batch's loss); other metrics are hapi's epoch aggregates.

Save kinds (`format`): `weights` is `paddle.save(network.state_dict())`
(`.pdparams`); `model` is `Model.save(path, training=False)`, a `paddle.jit`
inference model in a folder per checkpoint (`<name>/model.json` + `model.pdiparams`;
needs `paddle.Model(net, inputs=...)`, load with `paddle.jit.load("<name>/model")`);
`training_state` (the default and the rolling last) is what
`Model.save(path, training=True)` writes (`.pdparams`, `.pdopt` with the LR
scheduler, `.pdscaler` under AMP); the `.pdopt` also holds, under the key
`checkpoint_hooks@@`, the resume payload (`core.resume_state`, plain data): the
epoch, global step, parameter names, a float learning rate and the random states
of every rank. `Model.load(path)` loads it as it is (optimizers ignore keys that
name none of their accumulators), and no file is added to what Model.save
writes: every file costs a hash and an fsync at each save.

`async_save=True`: at the epoch end the training thread only copies the state
to host memory (numpy arrays, what paddle.save pickles); writing and hashing the
files, the fsyncs, the commit and pruning run in a background thread while the
next epoch trains (a `model` save is still exported on the training thread).
The next save, the end of fit() and an exception wait for it, and its error
surfaces there. Saves on preemption are always synchronous.

Resume: `fit()` has no initial epoch, so with `resume="auto"` the callback lets
`fit(epochs=N)` walk through the finished epochs without running them and
restores the newest verified training_state where the next epoch begins;
training ends after epoch N-1 in total. The other callbacks hear nothing of the
epochs passed over (no epoch or evaluation hooks), as Keras callbacks hear nothing
of the epochs before `initial_epoch`: they see the epochs that run, with real logs,
and their own counters (EarlyStopping, ReduceLROnPlateau) start at the resumed epoch.
Every file read on resume is checked before it is unpickled (`safe_load`): a file
whose pickle would run code is refused with `UnsafeCheckpointError`.

Step and time saves: `every_n_steps` and `every_n_minutes` write a training_state
(the rolling last) between two training batches, once every callback's hooks of
the earlier batch ran. A trigger that falls on an epoch's last batch is served by
that epoch's own save, after evaluation. With `accumulate_grad_batches` steps count
batches and these saves wait for a batch that ends an accumulation.

Preemption (`save_on_preemption`, on by default): a SIGTERM during fit() only
marks the request; between the current batch and the next (or at the next epoch
start, after evaluation) the callback saves a training_state tagged `preempted`,
puts back the SIGTERM handler that was there before fit() and raises the signal
again, so the process ends as SIGTERM would have ended it (data loader workers
are stopped first), or the user's own handler runs and fit() stops there. Under
several ranks they agree on the stop at every such point and the others wait for
rank 0's save. An exception escaping a training or evaluation pass (Ctrl-C
included, not the checkpointing's own errors) saves one too, in a single process.

Resume from a mid-epoch checkpoint: hapi's fit() cannot skip the batches of an
epoch already trained on, so that epoch starts over from its first batch with
the restored weights, optimizer and random states. Its early batches are trained
on twice and the global step counts them again; the epoch count stays right (the
run still ends after epoch N-1), but the result is not that of an uninterrupted
run. A warning says so when it happens.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import paddle

from checkpoint_hooks.core import Engine, MonitorError, Record
from checkpoint_hooks.core.engine import TRAINING_STATE
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.planner import Plan
from checkpoint_hooks.core.session import FitSession, KeptCheckpoints
from checkpoint_hooks.paddle.arguments import build_policy, without_dots
from checkpoint_hooks.paddle.framework import PaddleFramework
from checkpoint_hooks.paddle.hapi import BetweenBatches, EpochMean, below, fit_arguments, fit_frame, has_loss, metrics
from checkpoint_hooks.paddle.io import STATE_KEY
from checkpoint_hooks.paddle.io import host_copy as _host_copy  # noqa: F401  (benchmarks/snapshot_copy.py)
from checkpoint_hooks.paddle.safe_load import UnsafeCheckpointError
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, load_policy

__all__ = ["STATE_KEY", "BestCheckpoint", "UnsafeCheckpointError"]

log = logging.getLogger("checkpoint_hooks")

_SHIM_MARK = "_checkpoint_hooks_shim"
# The CallbackList hooks of an epoch; for an epoch passed over on resume only this callback hears them.
_EPOCH_HOOKS = frozenset({"on_epoch_begin", "on_epoch_end", "on_eval_begin", "on_eval_end"})

F = TypeVar("F", bound=Callable[..., Any])


def _releasing(method: F) -> F:
    """End the fit (release the directory, undo the epoch shim) when a hook raises: fit() calls no hook on errors."""

    @functools.wraps(method)
    def wrapper(self: BestCheckpoint, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._finish(failing=True)
            raise

    return wrapper  # type: ignore[return-value]


class BestCheckpoint(KeptCheckpoints, paddle.callbacks.ModelCheckpoint):
    """Keep the best checkpoints by a monitored metric, periodic snapshots and a rolling last; resume fit().

    It is a `ModelCheckpoint` and takes its arguments, so `fit()` adds no checkpoint
    callback of its own; `fit(save_dir=...)` is where it writes when it has no directory
    of its own (EarlyStopping writes its best model there too).

    Args:
        save_freq: Paddle's ModelCheckpoint argument: a snapshot every N epochs, outside
            the top-k rotation (not given: no snapshots unless `snapshots` asks).
        save_dir: Paddle's ModelCheckpoint argument: the checkpoint directory (`dirpath`).
        monitor: metric to rank checkpoints by: `val_<name>` for evaluation values
            (`val_loss`, `val_acc`), the plain name for training values (`loss`, `acc`).
        policy: a `CheckpointPolicy`, a dict of its fields or a YAML file path.
        dirpath: checkpoint directory, a local path or an fsspec URL.
        snapshots: every N epochs outside the top-k rotation: an int N or
            `{"every_n_epochs": N, "keep": M}`.
        **options: other policy fields (mode, min_delta, save_best_only, top_k, format,
            filename, last, resume, verify, on_save_error, verbose); they override `policy`.
    """

    def __init__(
        self,
        save_freq: int | None = None,
        save_dir: str | os.PathLike[str] | None = None,
        *,
        monitor: str | None = None,
        policy: CheckpointPolicy | Mapping[str, Any] | str | Path | None = None,
        dirpath: str | os.PathLike[str] | None = None,
        snapshots: int | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if monitor is not None:
            options["monitor"] = monitor
        built, self._own_directory = build_policy(
            save_freq, save_dir, policy=policy, dirpath=dirpath, snapshots=snapshots, options=options
        )
        super().__init__(save_freq=save_freq or 1, save_dir=built.dirpath)
        self.model: paddle.Model | None = None  # ModelCheckpoint.__init__ skips Callback.__init__
        self.params = {}  # type: ignore[typeddict-item]
        self.policy: CheckpointPolicy = built
        self._built_policy = built  # what the arguments asked for; a fit may write to its save_dir instead
        self._warned_save_dir = False
        self._paddle = PaddleFramework(self)
        self.session = FitSession(self.policy, self._paddle)
        self.resumed_from: Record | None = None
        self.start_epoch = 0
        self._in_fit = False
        self._stopping = False  # training was asked to stop (SIGTERM): the rest of this fit passes
        self._fit_callbacks: Any = None
        self._fit_frame: FrameType | None = None
        self._epoch = -1
        self._global_step = 0
        self._pending: tuple[int, dict[str, Any]] | None = None  # a finished epoch waiting for its save
        self._train_loss = EpochMean()
        self._eval_loss = EpochMean()
        self._eval_names: list[str] | None = None
        self._epoch_steps = 0  # batches trained in the current epoch
        self._epoch_length: int | None = None
        self._loader: BetweenBatches | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, **options: Any) -> BestCheckpoint:
        """A callback from a YAML policy file; keyword options override its fields."""
        return cls(policy=CheckpointPolicy.from_yaml(path), **options)

    # -- what the run kept ------------------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        return self.session.engine

    @property
    def hapi_model(self) -> Any:
        """The paddle.Model of the running fit (typed Any: hapi internals are used)."""
        if self.model is None:
            raise CheckpointError("BestCheckpoint needs a paddle.Model; pass it in fit(callbacks=[...])")
        return self.model

    # -- fit hooks --------------------------------------------------------------------

    @_releasing
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._remove_shim()  # one a fit() that raised where no hook ran left behind
        self._check_model()
        self._in_fit, self._stopping = True, False
        self._fit_frame = fit_frame()
        arguments = fit_arguments(self._fit_frame)
        self._fit_callbacks = arguments.get("cbks")
        self._use_policy(self._policy_for_fit(arguments.get("save_dir"), arguments.get("save_freq")))
        self._epoch, self._global_step, self._epoch_steps = -1, 0, 0
        self._pending = None
        self.start_epoch = 0
        # Paddle's C++ crash reporter also catches SIGTERM, but Python sees SIG_DFL there: after fit()
        # SIGTERM gets the default action, ending the process the same way, without the report.
        point = self.session.begin(is_current=self._fit_running, on_stale=lambda: self._finish(failing=True))
        self.resumed_from = point.record if point is not None else None
        if point is None:
            self._paddle.loaded = None  # read, but not the checkpoint training continues from
        else:
            self._global_step = point.step
            engine = self.session.engine
            epochs = (self.params or {}).get("epochs")
            complete = self.session.note_complete(epochs if isinstance(epochs, int) else None)
            if not complete and self.start_epoch > 0 and engine is not None:
                log.log(engine.level, "resuming at epoch %d: epochs 0-%d are done and fit() passes over them",
                        self.start_epoch, self.start_epoch - 1)
        self._install_shim()
        if self.start_epoch > 0:
            self._install_callback_filter()

    @_releasing
    def on_epoch_begin(self, epoch: int | None = None, logs: Mapping[str, Any] | None = None) -> None:
        if not self._in_fit or self._stopping:
            return
        # Epoch e-1 is saved here, after every callback's hooks of epoch e-1 ran (the LRScheduler
        # callback steps after ours), and a resume restores at the same point of the same hook,
        # so callbacks before and after this one see the same state in both runs.
        self._flush()
        if self.session.stop_requested():
            self.session.stop_for_preemption()
            return
        self._epoch = int(epoch or 0)
        self._epoch_steps = 0
        self._train_loss = EpochMean()
        self.session.epoch_begin(self._epoch)
        if self._epoch == self.start_epoch:
            self._paddle.restore()

    def on_train_batch_end(self, step: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._in_fit and not self._stopping:
            self._global_step += 1
            self._epoch_steps += 1
            if has_loss((self.params or {}).get("metrics")):
                self._train_loss.add(logs)

    @_releasing
    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._in_fit or self._stopping or epoch < self.start_epoch:
            return
        values = metrics(logs, (self.params or {}).get("metrics"))
        mean = self._train_loss.value()
        if mean is not None:
            values["loss"] = mean
        self._pending = (epoch, values)
        monitor = self.policy.monitor
        if monitor is not None and not monitor.startswith("val_"):
            self.session.check_monitor(values, strict=True)

    def on_eval_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._eval_loss = EpochMean()
        self._eval_names = (logs or {}).get("metrics")

    def on_eval_batch_end(self, step: int, logs: Mapping[str, Any] | None = None) -> None:
        if has_loss(self._eval_names):
            self._eval_loss.add(logs)

    @_releasing
    def on_eval_end(self, logs: Mapping[str, Any] | None = None) -> None:
        # Also called by model.evaluate(callbacks=...) outside fit, and for passed-over epochs.
        if not self._in_fit or self._stopping or self._pending is None or self._pending[0] != self._epoch:
            return
        values = metrics(logs, self._eval_names)
        mean = self._eval_loss.value()
        if mean is not None:
            values["loss"] = mean
        epoch_metrics = self._pending[1]
        epoch_metrics.update({"val_" + k: v for k, v in values.items()})
        if self.policy.monitor is not None and self.policy.monitor.startswith("val_"):
            self.session.check_monitor(epoch_metrics, strict=True)

    @_releasing
    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._in_fit and not self._stopping:
            self._remove_shim()
            self._paddle.restore()  # when every epoch was done already
            self._flush()
            # Training is complete and saved: a SIGTERM that came during the last epoch's evaluation
            # ends the process now.
            if self.session.stop_requested():
                self.session.stop_for_preemption()
        self._finish()  # waits for a background save: its error is the fit's

    # -- fit's own save arguments ---------------------------------------------------------

    def _policy_for_fit(self, save_dir: Any, save_freq: Any) -> CheckpointPolicy:
        """The policy of this fit: the callback's, in `fit(save_dir=...)` when it has no directory of its own."""
        policy = self._built_policy
        if save_dir is None:
            return policy
        save_dir = os.fspath(save_dir)
        if self._own_directory:
            if save_dir != policy.dirpath and not self._warned_save_dir:
                self._warned_save_dir = True
                log.warning(
                    "fit(save_dir=%r) is ignored: BestCheckpoint writes to its own dirpath %r; pass the directory "
                    "to one of them only", save_dir, policy.dirpath,
                )
            return policy
        changes: dict[str, Any] = {"dirpath": save_dir}
        if isinstance(save_freq, int) and save_freq > 1 and policy.snapshots.every_n_epochs is None:
            changes["snapshots"] = {**policy.snapshots.model_dump(), "every_n_epochs": save_freq}
        return load_policy(policy, **changes)

    def _use_policy(self, policy: CheckpointPolicy) -> None:
        self.policy = self.session.policy = policy
        self.save_dir = policy.dirpath

    # -- checks -----------------------------------------------------------------------

    def _check_model(self) -> None:
        model = self.hapi_model
        if not paddle.in_dynamic_mode():
            raise PolicyError(
                "BestCheckpoint works in dynamic graph mode (the default); call paddle.disable_static() "
                "before building the Model. Received: static graph mode"
            )
        fmt = self.policy.format or TRAINING_STATE
        if fmt == "model" and (model._input_info is None or model._is_shape_inferred):
            raise PolicyError(
                "format='model' saves a paddle.jit inference model, which needs the input specs; build the Model "
                "with them, e.g. paddle.Model(net, inputs=[paddle.static.InputSpec([None, 4], 'float32', 'x')]), "
                "or use format='weights' or 'training_state'. Received: paddle.Model(..., inputs=None)"
            )
        monitor = self.policy.monitor
        if monitor is not None and monitor.startswith("val_") and getattr(model, "_test_dataloader", None) is None:
            raise MonitorError(
                f"monitor={monitor!r} is an evaluation metric but fit() got no eval_data; pass eval_data to fit(), "
                f"or monitor a training metric such as {monitor[4:]!r}"
            )

    # -- saving and stopping ----------------------------------------------------------

    def _flush(self) -> None:
        """Save the finished epoch waiting for its evaluation and the other callbacks' hooks."""
        pending, self._pending = self._pending, None
        if pending is not None and self.session.engine is not None:
            adjust = self._loadable_names if self.policy.filename is None else None
            self.session.epoch_end(pending[0], self._global_step, pending[1], adjust=adjust)

    def _loadable_names(self, plan: Plan) -> Plan:
        """`plan` with names Model.load(prefix) reads (no dot), chosen by the writer against its index."""
        engine = self.session.engine
        renamed = without_dots(plan, engine.manifest) if engine is not None and self._paddle.is_writer() else None
        renamed = self._paddle.broadcast(renamed)
        return renamed if renamed is not None else plan

    def _running_metrics(self) -> dict[str, Any]:
        mean = self._train_loss.value()
        return {} if mean is None else {"loss": mean}

    def _between_batches(self) -> bool:
        """A safe point of a training epoch: after every hook of a batch, before the next is drawn.

        Returns whether the epoch ends here (training was asked to stop).
        """
        if self._in_fit and not self._stopping:
            last = self._epoch_length is not None and self._epoch_steps >= self._epoch_length
            accumulate = int(getattr(self.hapi_model, "_accumulate", 1) or 1)
            self.session.batch_end(
                self._global_step,
                last_batch=last,
                metrics=self._running_metrics,
                # gradients of an unfinished accumulation are in no checkpoint
                can_save=last or self._epoch_steps % accumulate == 0,
            )
        return self._stopping

    def _request_stop(self) -> None:
        """After a save on SIGTERM: train no further batch; stop the loader's workers if the signal ends the process."""
        self._stopping = True
        self.hapi_model.stop_training = True
        if self.session.signal_ends_process and self._loader is not None:
            self._loader.close()  # the process ends with the signal; its cleanup would not run

    def _on_pass_exception(self, exc: BaseException) -> None:
        """An exception escapes a pass of this fit: save the finished epoch waiting for it, then a preempted state."""
        try:
            if self.session.should_save_on(exc):
                self._flush()
        except Exception as error:
            log.error("could not save epoch %d after %s: %s", self._epoch, type(exc).__name__, error)
        finally:
            self.session.on_exception(exc)  # saves a training state when the rules say so, then ends the fit
            self._finish(failing=True)

    def _finish(self, failing: bool = False) -> None:
        """Undo what this fit installed and end the session (see `FitSession.end`)."""
        self._in_fit = False
        self._remove_callback_filter()
        self._fit_callbacks = None
        self._fit_frame = None
        self._loader = None
        self._remove_shim()
        self.session.end(failing=failing)

    def _fit_running(self, frame: FrameType | None) -> bool:
        """Whether this callback's fit() is on the stack of `frame` (an exception may have ended it unseen)."""
        if not self._in_fit:
            return False
        return self._fit_frame is None or below(frame, self._fit_frame)

    # -- passing over finished epochs ---------------------------------------------------

    def _install_shim(self) -> None:
        """Wrap model._run_one_epoch for this fit: pass over finished epochs, save on an escaping exception.

        fit() calls `self._run_one_epoch`, so an instance attribute takes its place for
        this fit only. It acts only for the CallbackList of this fit (the one its first
        training epoch passes), so a later evaluate() is never affected, even if a fit
        died where no hook could remove it.
        """
        model = self.hapi_model
        original = model._run_one_epoch
        before = model.__dict__.get("_run_one_epoch")

        def run_one_epoch(data_loader: Any, callbacks: Any, mode: str, *args: Any, **kwargs: Any) -> Any:
            if self._in_fit and self._fit_callbacks is None and mode == "train":
                self._fit_callbacks = callbacks
            if not (self._in_fit and callbacks is self._fit_callbacks):
                return original(data_loader, callbacks, mode, *args, **kwargs)
            if mode in ("train", "eval") and (self._stopping or self._epoch < self.start_epoch):
                if mode == "train" and not self._stopping:
                    # hapi's DistributedBatchSampler reseeds its shuffle from an epoch counter that
                    # advances on every pass: run the pass so the next epoch draws the same order.
                    sampler = getattr(data_loader, "batch_sampler", None)
                    if sampler is not None:
                        for _ in sampler:
                            pass
                return {}
            if mode == "train":
                try:
                    self._epoch_length = len(data_loader)
                except TypeError:  # an iterable without a length: its last batch is known only after it
                    self._epoch_length = None
                data_loader = self._loader = BetweenBatches(data_loader, self._between_batches)
            try:
                return original(data_loader, callbacks, mode, *args, **kwargs)
            except BaseException as exc:
                self._on_pass_exception(exc)
                raise

        setattr(run_one_epoch, _SHIM_MARK, (self, before))
        model.__dict__["_run_one_epoch"] = run_one_epoch

    def _install_callback_filter(self) -> None:
        """Let only this callback hear the epoch and evaluation hooks of the epochs passed over.

        fit() calls them on its CallbackList for every epoch; the passes themselves run nothing,
        so the other callbacks would get empty logs (and a `logs["loss"]` would fail). They
        start hearing at the resumed epoch, as Keras callbacks do at `initial_epoch`.
        """
        callbacks = self._fit_callbacks
        if callbacks is None or "_call" in callbacks.__dict__:
            return
        original = callbacks._call

        def call(name: str, *args: Any) -> None:
            if self._in_fit and name in _EPOCH_HOOKS and self._passing_over(name, args):
                getattr(self, name)(*args)
                return
            original(name, *args)

        setattr(call, _SHIM_MARK, self)
        callbacks.__dict__["_call"] = call

    def _passing_over(self, name: str, args: tuple[Any, ...]) -> bool:
        epoch = int(args[0] or 0) if name in ("on_epoch_begin", "on_epoch_end") and args else self._epoch
        return epoch < self.start_epoch

    def _remove_callback_filter(self) -> None:
        callbacks = self._fit_callbacks
        if callbacks is not None and getattr(callbacks.__dict__.get("_call"), _SHIM_MARK, None) is self:
            del callbacks.__dict__["_call"]

    def _remove_shim(self) -> None:
        """Take out this callback's shim, or one a callback no longer in a fit left behind."""
        model = getattr(self, "model", None)
        if model is None:
            return
        current = model.__dict__.get("_run_one_epoch")
        mark = getattr(current, _SHIM_MARK, None)
        if mark is None:
            return
        owner, before = mark
        if owner is self or not owner._in_fit:
            if before is None:
                del model.__dict__["_run_one_epoch"]
            else:
                model.__dict__["_run_one_epoch"] = before
