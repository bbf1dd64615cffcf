"""`BestCheckpoint` for PaddlePaddle's high-level API (`paddle.Model.fit`).

    model.fit(train, eval_data, epochs=10, callbacks=[BestCheckpoint(monitor="val_loss")])

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
`checkpoint_hooks@@`, the epoch, global step, parameter names, a float learning
rate and the random states. `Model.load(path)` loads it as it is (optimizers
ignore keys that name none of their accumulators), and no file is added to what
Model.save writes: every file costs a hash and an fsync at each save.

`async_save=True`: at the epoch end the training thread only copies the state
to host memory (numpy arrays, what paddle.save pickles); writing and hashing the
files, the fsyncs, the commit and pruning run in a background thread while the
next epoch trains (a `model` save is still exported on the training thread).
The next save, the end of fit() and an exception wait for it, and its error
surfaces there. Saves on preemption are always synchronous.

Resume: `fit()` has no initial epoch, so with `resume="auto"` the callback lets
`fit(epochs=N)` walk through the finished epochs without running them and
restores the newest verified training_state where the next epoch begins;
training ends after epoch N-1 in total.

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
are stopped first), or the user's own handler runs. Under several ranks they
agree on the stop at every such point and the others wait for rank 0's save.
An exception escaping a training or evaluation pass (Ctrl-C included, not the
checkpointing's own errors) saves one too, in a single process.

Resume from a mid-epoch checkpoint: hapi's fit() cannot skip the batches of an
epoch already trained on, so that epoch starts over from its first batch with
the restored weights, optimizer and random states. Its early batches are trained
on twice and the global step counts them again; the epoch count stays right (the
run still ends after epoch N-1), but the result is not that of an uninterrupted
run. A warning says so when it happens.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import pickle
import random
import signal
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import paddle

from checkpoint_hooks.core import Engine, MonitorError, Record, SaveItem
from checkpoint_hooks.core.buffers import REUSE_MIN_BYTES, HostBuffers
from checkpoint_hooks.core.durable import DurableFile
from checkpoint_hooks.core.engine import Plan
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.preemption import SigtermWatch
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, load_policy

__all__ = ["BestCheckpoint"]

log = logging.getLogger("checkpoint_hooks")

TRAINING_STATE = "training_state"
# Under this key of the .pdopt: epoch, step, parameter names, learning rate, random states.
STATE_KEY = "checkpoint_hooks@@"
STATE_VERSION = 2
# Where version 1 kept them, in two more files beside the .pdparams (still read on resume).
STATE_SUFFIX = ".state.json"
RNG_SUFFIX = ".pdrng"
# Keys hapi puts into its logs that are bookkeeping, not metrics.
_NOT_METRICS = frozenset({"step", "batch_size"})
_SHIM_MARK = "_checkpoint_hooks_shim"
# paddle.save adds this table (structured -> unique parameter name) to every dict of tensors.
_NAME_TABLE = "StructuredToParameterName@@"
PICKLE_PROTOCOL = 4  # paddle.save's default

F = TypeVar("F", bound=Callable[..., Any])


def _rank() -> int:
    return int(paddle.distributed.get_rank())


def _world_size() -> int:
    return int(paddle.distributed.get_world_size())


def _inference_extension() -> str:
    """Where a `model` checkpoint's program file goes, relative to its name.

    Each inference model gets a folder of its own, `<name>/model.json` and
    `<name>/model.pdiparams`: `paddle.jit.load` reads every `<prefix>.<x>.json` next
    to the model as another function, and the checkpoint sidecars are named
    `<name>.meta.json`. With the legacy program format (PIR switched off) it is `.pdmodel`.
    """
    use_pir = getattr(paddle.framework, "use_pir_api", None)
    return "/model" + (".json" if use_pir is None or use_pir() else ".pdmodel")


def _prefix(path: str, extension: str) -> str:
    return path.removesuffix(extension)


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, paddle.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_holds_tensor(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(value) for value in obj)
    return False


class _Serialized(bytes):
    """The bytes of a file, serialized on the training thread."""


def _host_array(tensor: paddle.Tensor, buffers: HostBuffers[np.ndarray] | None) -> np.ndarray:
    """A host copy of `tensor`: into an array of `buffers` when it is large, else a new one."""
    if buffers is None or math.prod(tensor.shape) * tensor.element_size() < REUSE_MIN_BYTES:
        return tensor.numpy()  # less than a view and a copy, for a small tensor
    try:
        view = np.from_dlpack(tensor.detach())  # no copy: the tensor's own memory (detached: parameters too)
    except Exception:  # a GPU tensor, or bfloat16 (numpy has no such type): paddle copies it
        return tensor.numpy()
    array = buffers.take(view.shape, view.dtype)
    np.copyto(array, view)
    return array


def _host_copy(state: dict[str, Any], buffers: HostBuffers[np.ndarray] | None = None) -> Any:
    """What `paddle.save(state, path)` would pickle now, with every tensor copied to host memory.

    A state dict (tensors, and dicts without tensors) becomes paddle.save's own layout: numpy
    copies of the tensors, copies of the dicts, and the table of tensor names. Pickling it with protocol 4 later, on any thread,
    writes the bytes paddle.save writes. Anything else is serialized by paddle.save here.
    Tensors are copied into `buffers` when given, else into new arrays.
    """
    if all(isinstance(v, paddle.Tensor) or (isinstance(v, dict) and not _holds_tensor(v)) for v in state.values()):
        copy: dict[str, Any] = {}
        names: dict[str, str] = {}
        for key, value in state.items():
            if isinstance(value, paddle.Tensor):
                # a copy: training goes on changing the tensor in place
                copy[key] = _host_array(value, buffers)
                names[key] = value.name
            else:
                copy[key] = deepcopy(value)  # e.g. the LR scheduler's state, which its next step changes
        copy[_NAME_TABLE] = names
        return copy
    buffer = io.BytesIO()
    paddle.save(state, buffer)
    return _Serialized(buffer.getvalue())


def _save_files(item: SaveItem, files: Mapping[str, Any], path: str) -> None:
    """Write the host copies of `_snapshot` beside `path` (a .pdparams), each hashed as it is written."""
    prefix = _prefix(path, ".pdparams")
    for suffix, copy in files.items():
        with DurableFile(prefix + suffix) as f:
            if isinstance(copy, _Serialized):
                f.write(copy)
            else:
                pickle.dump(copy, f, protocol=PICKLE_PROTOCOL)


def _releasing(method: F) -> F:
    """Release the directory lock and undo the epoch shim when a hook raises: fit() calls no hook on errors."""

    @functools.wraps(method)
    def wrapper(self: BestCheckpoint, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._end_fit(failing=True)
            raise

    return wrapper  # type: ignore[return-value]


@dataclass
class _Resume:
    """Where this fit continues from: a training_state prefix, its optimizer state and what it says of itself."""

    prefix: str
    epoch: int  # the epoch it was saved in, 0-based; -1 when the checkpoint does not say
    state: dict[str, Any]
    mid_epoch: bool = False  # saved before `epoch` finished: that epoch runs again from its start
    optimizer: dict[str, Any] | None = None  # the .pdopt without our key; None when there is no .pdopt

    @property
    def start_epoch(self) -> int:
        return self.epoch if self.mid_epoch else self.epoch + 1


class _BetweenBatches:
    """A training data loader that calls `hook` after every batch, before the next one is drawn.

    hapi asks for the next batch once every callback's hooks of the current one ran (the
    LRScheduler callback steps after ours), so the state seen there is complete, as at an epoch end.
    """

    def __init__(self, loader: Any, hook: Callable[[], None]) -> None:
        self.loader = loader
        self.hook = hook
        self.iterator: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.iterator = iter(self.loader)
        for batch in self.iterator:
            yield batch
            self.hook()

    def close(self) -> None:
        """Stop the loader's worker processes, which a process ended by a signal would leave running."""
        if getattr(self.iterator, "_workers", None):  # Paddle's multi-process iterator
            try:
                self.iterator._try_shutdown_all(5)
            except Exception as exc:
                log.debug("could not stop the data loader's workers: %s", exc)


class _EpochMean:
    """Batch-size weighted mean of the loss over one epoch's batches."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    def add(self, logs: Mapping[str, Any] | None) -> None:
        if not logs or "loss" not in logs:
            return
        loss = logs["loss"]
        values = loss if isinstance(loss, (list, tuple)) else [loss]
        try:
            # hapi logs Python floats: summed without numpy, which is most of a batch's cost here
            value = float(sum(v if isinstance(v, float) else float(np.asarray(v).sum()) for v in values))
        except (TypeError, ValueError):
            return
        weight = float(logs.get("batch_size") or 1)
        self.total += value * weight
        self.count += weight

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class BestCheckpoint(paddle.callbacks.ModelCheckpoint):
    """Keep the best checkpoints by a monitored metric, periodic snapshots and a rolling last; resume fit().

    It is a `ModelCheckpoint`, so `fit()` adds no checkpoint callback of its own:
    `fit(save_dir=...)` then writes nothing (EarlyStopping still uses it for its
    best model). Put checkpoints where `dirpath` says.

    Args:
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
        monitor: str | None = None,
        *,
        policy: CheckpointPolicy | Mapping[str, Any] | str | Path | None = None,
        dirpath: str | os.PathLike[str] | None = None,
        snapshots: int | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(save_freq=1, save_dir=None)
        self.model: paddle.Model | None = None  # ModelCheckpoint.__init__ skips Callback.__init__
        self.params = {}  # type: ignore[typeddict-item]
        if monitor is not None:
            options["monitor"] = monitor
        if dirpath is not None:
            options["dirpath"] = os.fspath(dirpath)
        if snapshots is not None:
            options["snapshots"] = {"every_n_epochs": snapshots} if isinstance(snapshots, int) else snapshots
        self.policy: CheckpointPolicy = load_policy(policy, **options)
        self.engine: Engine | None = None
        self.resumed_from: Record | None = None
        self.start_epoch = 0
        self._resume: _Resume | None = None
        self._restored = False
        self._in_fit = False
        self._fit_callbacks: Any = None
        self._epoch = -1
        self._global_step = 0
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._train_loss = _EpochMean()
        self._eval_loss = _EpochMean()
        self._eval_names: list[str] | None = None
        self._epoch_steps = 0  # batches trained in the current epoch
        self._epoch_done = False  # the current epoch's last batch was trained
        self._trained = 0  # batches trained in this fit
        self._epoch_length: int | None = None
        self._state_step: int | None = None  # global step of the newest training_state (saved or resumed)
        self._state_in_flight: tuple[int, list[str]] | None = None  # step and names of a background save
        self._host_buffers: HostBuffers[np.ndarray] = HostBuffers(np.empty)  # what background saves copy the state into
        self._due_at_epoch_end = False
        self._preemption_saved = False
        self._sigterm = False
        self._sigterm_shared = False
        self._watch = SigtermWatch(on_signal=self._note_sigterm)
        self._loader: _BetweenBatches | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, **options: Any) -> BestCheckpoint:
        """A callback from a YAML policy file; keyword options override its fields."""
        return cls(policy=CheckpointPolicy.from_yaml(path), **options)

    # -- what the run kept ------------------------------------------------------------

    @property
    def best_model_path(self) -> str:
        """Path of the best checkpoint's primary file ('' before the first save)."""
        return self.engine.best_model_path if self.engine else ""

    @property
    def best_model_score(self) -> float | None:
        return self.engine.best_model_score if self.engine else None

    @property
    def last_model_path(self) -> str:
        """Path of the rolling last training_state's `.pdparams` ('' before the first save)."""
        return self.engine.last_model_path if self.engine else ""

    # -- fit hooks --------------------------------------------------------------------

    @_releasing
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._end_fit(failing=True)  # a fit() that raised before never reached on_train_end
        self._check_model()
        self._in_fit = True
        self._epoch = -1
        self._global_step = 0
        self._pending = None
        self._restored = False
        self._resume = None
        self.start_epoch = 0
        self._epoch_steps = 0
        self._epoch_done = False
        self._trained = 0
        self._state_step = None
        self._state_in_flight = None
        self._due_at_epoch_end = False
        self._preemption_saved = False
        self._sigterm = False
        self.engine = Engine(
            self.policy,
            extensions={"weights": ".pdparams", "model": _inference_extension(), TRAINING_STATE: ".pdparams"},
            default_format=TRAINING_STATE,
            resumable_formats=frozenset({TRAINING_STATE}),
            epoch_base=0,
            is_writer=_rank() == 0,
        )
        self._resume = self._find_resume()
        if self._resume is not None:
            self.start_epoch = self._resume.start_epoch
            self._global_step = int(self._resume.state.get("global_step", 0))
            self._state_step = self._global_step
            self._log_resume(self._resume)
        self._install_shim()
        # Agreeing on a SIGTERM is a collective on every safe point; its result decides on all ranks alike.
        self._sigterm_shared = self.policy.save_on_preemption and _world_size() > 1
        self._install_signal_handler()

    @_releasing
    def on_epoch_begin(self, epoch: int | None = None, logs: Mapping[str, Any] | None = None) -> None:
        # Epoch e-1 is saved here, after every callback's hooks of epoch e-1 ran (the LRScheduler
        # callback steps after ours), and a resume restores at the same point of the same hook,
        # so callbacks before and after this one see the same state in both runs.
        self._flush()
        if self._stop_requested():
            self._stop()
        self._epoch = int(epoch or 0)
        self._epoch_steps = 0
        self._epoch_done = False
        self._train_loss = _EpochMean()
        if self._epoch == self.start_epoch:
            self._restore()

    def on_train_batch_end(self, step: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._in_fit:
            self._global_step += 1
            self._epoch_steps += 1
            self._trained += 1
            if _has_loss((self.params or {}).get("metrics")):
                self._train_loss.add(logs)

    @_releasing
    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._in_fit or epoch < self.start_epoch:
            return
        self._epoch_done = True
        metrics = _metrics(logs, (self.params or {}).get("metrics"))
        mean = self._train_loss.value()
        if mean is not None:
            metrics["loss"] = mean
        self._pending = (epoch, metrics)
        monitor = self.policy.monitor
        if monitor is not None and not monitor.startswith("val_"):
            self._require_monitor(metrics)

    def on_eval_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._eval_loss = _EpochMean()
        self._eval_names = (logs or {}).get("metrics")

    def on_eval_batch_end(self, step: int, logs: Mapping[str, Any] | None = None) -> None:
        if _has_loss(self._eval_names):
            self._eval_loss.add(logs)

    @_releasing
    def on_eval_end(self, logs: Mapping[str, Any] | None = None) -> None:
        # Also called by model.evaluate(callbacks=...) outside fit, and for passed-over epochs.
        if not self._in_fit or self._pending is None or self._pending[0] != self._epoch:
            return
        values = _metrics(logs, self._eval_names)
        mean = self._eval_loss.value()
        if mean is not None:
            values["loss"] = mean
        metrics = self._pending[1]
        metrics.update({"val_" + k: v for k, v in values.items()})
        if self.policy.monitor is not None and self.policy.monitor.startswith("val_"):
            self._require_monitor(metrics)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        try:
            if self._in_fit:
                self._remove_shim()
                self._restore()  # when every epoch was done already
                self._flush()
                # Training is complete and saved: a SIGTERM that came during the last epoch's
                # evaluation only ends the process now (in _end_fit, after the lock is released).
                self._sigterm = self._stop_requested()
        except BaseException:
            self._end_fit(failing=True)
            raise
        self._end_fit()  # waits for a background save: its error is the fit's

    @property
    def _model(self) -> Any:
        """The paddle.Model of the running fit (typed Any: hapi internals are used)."""
        if self.model is None:
            raise CheckpointError("BestCheckpoint needs a paddle.Model; pass it in fit(callbacks=[...])")
        return self.model

    # -- checks -----------------------------------------------------------------------

    def _check_model(self) -> None:
        model = self._model
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

    def _require_monitor(self, metrics: Mapping[str, Any]) -> None:
        assert self.engine is not None
        self.engine.require_monitor(metrics)

    # -- saving -----------------------------------------------------------------------

    def _flush(self) -> None:
        """Save the finished epoch waiting for its evaluation and the other callbacks' hooks."""
        pending, self._pending = self._pending, None
        deferred, self._due_at_epoch_end = self._due_at_epoch_end, False
        engine = self.engine
        if pending is None or engine is None or not engine.is_writer:
            return
        epoch, metrics = pending
        saved_state = self._execute(engine.plan(epoch, self._global_step, metrics))
        if deferred and not saved_state:
            # A step or time save that fell on the epoch's last batch, with last=False.
            self._execute(engine.plan_training_state(epoch, self._global_step, metrics, mid_epoch=False))

    def _execute(self, plan: Plan, background: bool | None = None) -> bool:
        """Save `plan`; whether it holds a training_state that was saved (or is being saved, in the background).

        `background` defaults to `async_save`: the files are written here, the rest runs in the engine's worker.
        """
        engine = self.engine
        assert engine is not None
        self._settle()
        write = functools.partial(self._write, plan.epoch)
        if self.policy.async_save if background is None else background:
            if all(item.format != "model" for item in plan.items):
                # Only the copy of the state to host memory happens here; the files are written in the worker.
                snapshot = functools.partial(self._snapshot, plan.epoch, buffers=self._host_buffers)
                engine.execute_async(plan, snapshot, _save_files, self._host_buffers)
            else:
                engine.execute(plan, write, background=True)  # paddle.jit.save runs here, the rest in the worker
            names = [item.name for item in plan.items if item.format == TRAINING_STATE]
            if names:
                self._state_in_flight = (plan.step, names)
            return bool(names)
        records = engine.execute(plan, write)
        if any(r.format == TRAINING_STATE for r in records):
            self._state_step = plan.step
            return True
        return False

    def _settle(self) -> None:
        """Wait for a background save (raising its error); count its training_state once it is committed."""
        engine = self.engine
        assert engine is not None
        engine.wait()
        in_flight, self._state_in_flight = self._state_in_flight, None
        if in_flight is not None and any(engine.manifest.by_name(name) is not None for name in in_flight[1]):
            self._state_step = in_flight[0]

    def _running_metrics(self) -> dict[str, Any]:
        mean = self._train_loss.value()
        return {} if mean is None else {"loss": mean}

    def _between_batches(self) -> None:
        """A safe point of a training epoch: after every hook of a batch, before the next is drawn."""
        engine = self.engine
        if not self._in_fit or engine is None:
            return
        if self._epoch_length is not None and self._epoch_steps >= self._epoch_length:
            self._epoch_done = True
        if self._stop_requested():
            self._stop()
            return
        policy = self.policy
        if not engine.is_writer or (policy.every_n_steps is None and policy.every_n_minutes is None):
            return
        accumulate = int(getattr(self._model, "_accumulate", 1) or 1)
        if not self._epoch_done and self._epoch_steps % accumulate:
            return  # gradients of an unfinished accumulation are in no checkpoint
        if engine.step_due(self._global_step) or engine.time_due():
            if self._epoch_done:
                self._due_at_epoch_end = True  # the epoch's own save follows its evaluation
            else:
                self._execute(
                    engine.plan_training_state(self._epoch, self._global_step, self._running_metrics(), mid_epoch=True)
                )

    # -- preemption -------------------------------------------------------------------

    def _install_signal_handler(self) -> None:
        """Catch SIGTERM for this fit, keeping the handler it replaces."""
        if self.policy.save_on_preemption:
            # Paddle's C++ crash reporter also catches SIGTERM, but Python sees SIG_DFL there: after
            # fit() SIGTERM gets the default action, ending the process the same way, without the report.
            self._watch.install()

    def _note_sigterm(self) -> None:
        self._sigterm = True  # saving here could interrupt a training step half-way: only mark the request

    def _stop_requested(self) -> bool:
        """Whether a SIGTERM came (on any rank, under several processes)."""
        if not self._sigterm_shared:
            return self._sigterm
        flag = paddle.to_tensor([1 if self._sigterm else 0], dtype="int32")
        paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
        return bool(flag.numpy()[0])

    def _stop(self) -> None:
        """Save a preempted training_state, then let SIGTERM end the process as it would have."""
        self._sigterm = False
        if self.engine is not None and self.engine.is_writer:
            log.warning("SIGTERM received; saving a training state to resume from before the process ends")
        else:
            log.warning("SIGTERM received (by this rank or another); stopping once rank 0 saved a training state")
        self._save_preempted()
        if self.engine is not None:
            try:
                self.engine.wait()  # a background save (async_save) is on disk before the process ends
            except Exception as exc:
                log.error("%s", exc)
        if _world_size() > 1:
            paddle.distributed.barrier()  # rank 0 writes; the others must not end it before it is done
        if self._watch.previous == signal.SIG_DFL and self._loader is not None:
            self._loader.close()  # the process ends with the signal; its cleanup would not run
        self._watch.end_process()

    def _on_exception(self, exc: BaseException) -> None:
        """An exception escapes a pass of this fit: save a preempted training_state first.

        Not for errors of the checkpointing itself, and only in a single process: a save
        after an error on one rank would wait for the others forever.
        """
        if (
            not self.policy.save_on_preemption
            or not self._in_fit
            or self._preemption_saved
            or isinstance(exc, (CheckpointError, PolicyError))
            or _world_size() > 1
        ):
            return
        log.warning("%s stopped training; saving a training state to resume from", type(exc).__name__)
        self._save_preempted()

    def _save_preempted(self) -> None:
        """The training_state tagged preempted; never raises (the process is stopping anyway)."""
        engine = self.engine
        if self._preemption_saved or engine is None or not self._in_fit:
            return
        self._preemption_saved = True
        if self._trained == 0:
            log.log(engine.level, "no training step in this fit: nothing to save on preemption")
            return
        try:
            self._settle()
        except Exception as exc:  # a background save failed: the one on preemption goes ahead
            log.error("%s", exc)
        try:
            self._flush()  # a finished epoch waiting for its save comes first
            if not engine.is_writer:
                return
            self._settle()
            if self._state_step == self._global_step:
                last = engine.last_record
                log.warning(
                    "nothing trained since the training state %s was saved; it is the resume point",
                    last.name if last else f"of step {self._global_step}",
                )
                return
            if self._epoch_done or self._epoch_steps == 0:
                epoch, mid_epoch = (self._epoch if self._epoch_done else self._epoch - 1), False
            else:
                epoch, mid_epoch = self._epoch, True
            plan = engine.plan_training_state(
                epoch, self._global_step, self._running_metrics(), mid_epoch=mid_epoch, preempted=True
            )
            self._execute(plan, background=False)  # on disk before the process ends
        except Exception as exc:
            log.error("could not save a training state on preemption: %s", exc)

    def _write(self, epoch: int, item: SaveItem, path: str) -> None:
        if item.format == "model":
            self._write_model(path)
        else:
            _save_files(item, self._snapshot(epoch, item), path)

    def _write_model(self, path: str) -> None:
        model = self._model
        network = model.network
        training = network.training
        network.eval()  # export inference behaviour (dropout off, batch norm statistics)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            model.save(_prefix(path, os.path.splitext(path)[1]), training=False)
        finally:
            if training:
                network.train()
        if not os.path.exists(path):
            raise CheckpointError(f"paddle.jit.save wrote no {os.path.basename(path)}")

    def _snapshot(self, epoch: int, item: SaveItem, buffers: HostBuffers[np.ndarray] | None = None) -> dict[str, Any]:
        """The files of a `weights` or `training_state` item as {suffix: host copy of what paddle.save pickles}.

        A training_state is what `Model.save(prefix, training=True)` writes, with this callback's
        state inside the .pdopt. Nothing in the result shares memory with the live tensors.
        Tensors are copied into `buffers` when given.
        """
        model = self._model
        network = model.network
        files = {".pdparams": _host_copy(network.state_dict(), buffers)}
        if item.format == "weights":
            return files
        optimizer = model._optimizer
        learning_rate = None
        if optimizer is not None and not isinstance(optimizer._learning_rate, paddle.optimizer.lr.LRScheduler):
            # A float rate is not in the optimizer state; ReduceLROnPlateau changes it.
            learning_rate = float(optimizer.get_lr())
        optimizer_state = dict(optimizer.state_dict()) if optimizer is not None else {}  # with LR_Scheduler
        optimizer_state[STATE_KEY] = {
            "version": STATE_VERSION,
            "epoch": epoch,
            "global_step": self._global_step,
            # Saved before `epoch` finished, after this many of its batches: a resume runs it again.
            "mid_epoch": item.mid_epoch,
            "epoch_step": self._epoch_steps if item.mid_epoch else None,
            # Optimizer keys embed process-wide unique parameter names; this maps them back on load.
            "param_names": {name: p.name for name, p in network.named_parameters()},
            "learning_rate": learning_rate,
            "world_size": _world_size(),
            # Pickled here: paddle.save walks every element of nested lists and tuples (Python's random
            # state holds 625 of them), which cost more than the rest of the .pdopt.
            "rng": pickle.dumps(
                {"paddle": paddle.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                protocol=pickle.HIGHEST_PROTOCOL,
            ),
        }
        files[".pdopt"] = _host_copy(optimizer_state, buffers)
        scaler = getattr(model, "_scaler", None)
        if scaler is not None:
            scaler_state = scaler.state_dict()
            if scaler_state:
                files[".pdscaler"] = _host_copy(scaler_state, buffers)
        return files

    # -- resume -----------------------------------------------------------------------

    def _find_resume(self) -> _Resume | None:
        """Rank 0 picks the checkpoint (and adopts it into its retention state); every rank loads it."""
        engine = self.engine
        assert engine is not None
        choice: dict[str, Any] = {}
        if engine.is_writer:
            try:
                choice = self._choose_resume()
            except Exception as exc:
                if _world_size() <= 1:
                    raise
                choice = {"error": (type(exc).__name__, str(exc))}
        choice = _broadcast(choice)
        if "error" in choice:
            kind, message = choice["error"]
            raise (PolicyError if kind == "PolicyError" else CheckpointError)(message)
        if choice.get("record"):
            record = Record.from_json(choice["record"])
            self.resumed_from = record
            prefix = _prefix(engine.local_path(record), ".pdparams")
        elif choice.get("path"):
            self.resumed_from = None
            prefix = choice["path"]
        else:
            self.resumed_from = None
            return None
        return _read_resume(prefix, choice.get("epoch"), choice.get("mid_epoch"))

    def _choose_resume(self) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        record = engine.start()
        if record is not None:
            return {"record": record.to_json(), "epoch": record.epoch, "mid_epoch": record.mid_epoch}
        resume = self.policy.resume
        if resume in ("auto", "never"):
            return {}
        # An explicit path: one of this directory's checkpoints, or a Model.save(training=True) prefix.
        prefix = _prefix(resume, ".pdparams")
        record = engine.find_record(resume) or engine.find_record(prefix + ".pdparams")
        if record is not None:
            if record.format != TRAINING_STATE:
                raise PolicyError(
                    f"resume={resume!r} is a {record.format!r} checkpoint, which holds no optimizer state; resume "
                    "from a training_state checkpoint (the rolling last-epoch=... or a training_state save)"
                )
            engine.adopt(record, discard_newer=False)
            return {"record": record.to_json(), "epoch": record.epoch, "mid_epoch": record.mid_epoch}
        if not os.path.exists(prefix + ".pdparams"):
            raise PolicyError(
                f"resume={resume!r} is not a checkpoint: {prefix + '.pdparams'!r} does not exist; "
                "pass a training_state path, 'auto' or 'never'"
            )
        return {"path": prefix}

    def _log_resume(self, resume: _Resume) -> None:
        assert self.engine is not None
        start = resume.start_epoch
        passed = f"epochs 0-{start - 1} are done and fit() passes over them" if start > 0 else ""
        if resume.mid_epoch:
            batches = resume.state.get("epoch_step")
            log.warning(
                "resuming from %s, saved during epoch %d%s: fit() cannot skip batches, so epoch %d starts over "
                "from its first batch with the restored weights and trains on those batches again%s",
                os.path.basename(resume.prefix),
                resume.epoch,
                f" after {batches} of its batches" if batches is not None else "",
                start,
                f"; {passed}" if passed else "",
            )
        elif start > 0:
            log.log(self.engine.level, "resuming at epoch %d: %s", start, passed)

    def _restore(self) -> None:
        """Load the resume checkpoint into the network, optimizer, LR scheduler, scaler and random states."""
        if self._resume is None or self._restored:
            return
        self._restored = True
        resume = self._resume
        model = self._model
        state = resume.state
        params = paddle.load(resume.prefix + ".pdparams")
        params.pop(_NAME_TABLE, None)
        names = state.get("param_names") or _name_table(resume.prefix + ".pdparams")
        missing, unexpected = model.network.set_state_dict(params)
        if missing:
            raise CheckpointError(
                f"checkpoint {resume.prefix}.pdparams does not fit this network: it lacks {', '.join(missing)}; "
                "resume with the network it was saved from, or set resume='never'"
            )
        if unexpected:
            log.warning("checkpoint %s.pdparams has entries this network lacks: %s", resume.prefix, ", ".join(unexpected))
        optimizer = model._optimizer
        saved, resume.optimizer = resume.optimizer, None  # loaded by _read_resume; not kept after the restore
        if optimizer is not None and saved:
            optimizer.set_state_dict(_rename_optimizer_state(saved, names, model))
        learning_rate = state.get("learning_rate")
        if (
            optimizer is not None
            and learning_rate is not None
            and not isinstance(optimizer._learning_rate, paddle.optimizer.lr.LRScheduler)
        ):
            optimizer.set_lr(float(learning_rate))
        scaler = getattr(model, "_scaler", None)
        if scaler is not None and os.path.exists(resume.prefix + ".pdscaler"):
            scaler.load_state_dict(paddle.load(resume.prefix + ".pdscaler"))
        # Random states are per process; with several ranks only rank 0's were saved.
        rng = pickle.loads(state["rng"]) if isinstance(state.get("rng"), bytes) else None
        if _world_size() <= 1 and rng is not None:
            try:
                paddle.set_rng_state(rng["paddle"])
            except (ValueError, RuntimeError) as exc:  # saved on another device type
                log.warning("could not restore Paddle's random state from %s.pdopt: %s", resume.prefix, exc)
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        level = self.engine.level if self.engine else logging.DEBUG
        log.log(level, "restored %s (epoch %d, step %d)", resume.prefix, resume.epoch, self._global_step)

    # -- passing over finished epochs ---------------------------------------------------

    def _install_shim(self) -> None:
        """Wrap model._run_one_epoch for this fit: pass over finished epochs, release the lock on errors.

        fit() calls `self._run_one_epoch`, so an instance attribute takes its place for
        this fit only. It acts only for the CallbackList of this fit (the one its first
        training epoch passes), so a later evaluate() is never affected, even if a fit
        died where no hook could remove it.
        """
        model = self._model
        original = model._run_one_epoch
        before = model.__dict__.get("_run_one_epoch")

        def run_one_epoch(data_loader: Any, callbacks: Any, mode: str, *args: Any, **kwargs: Any) -> Any:
            if self._in_fit and self._fit_callbacks is None and mode == "train":
                self._fit_callbacks = callbacks
            if not (self._in_fit and callbacks is self._fit_callbacks):
                return original(data_loader, callbacks, mode, *args, **kwargs)
            if mode in ("train", "eval") and self._epoch < self.start_epoch:
                if mode == "train":
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
                data_loader = self._loader = _BetweenBatches(data_loader, self._between_batches)
            try:
                return original(data_loader, callbacks, mode, *args, **kwargs)
            except BaseException as exc:
                self._on_exception(exc)
                self._end_fit(failing=True)
                raise

        setattr(run_one_epoch, _SHIM_MARK, (self, before))
        model.__dict__["_run_one_epoch"] = run_one_epoch

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

    def _end_fit(self, failing: bool = False) -> None:
        """Undo what this fit installed and release the directory once a background save is done.

        That save's error is raised, or only logged when another exception (`failing`) is on its way.
        """
        self._in_fit = False
        self._fit_callbacks = None
        self._loader = None
        self._remove_shim()
        self._watch.restore()
        error: Exception | None = None
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception as exc:
                error = exc
        if error is not None and (failing or self._sigterm):
            log.error("%s", error)
        if self._sigterm:
            # A SIGTERM that found no safe point to stop at is never dropped.
            self._sigterm = False
            signal.raise_signal(signal.SIGTERM)
        if error is not None and not failing:
            raise error


def _metrics(logs: Mapping[str, Any] | None, names: Any) -> dict[str, Any]:
    """A copy of the metrics in hapi's logs.

    hapi keeps one logs dict for training and evaluation, for the whole process (a
    mutable default argument): it must be copied, and keys left by an earlier fit
    or evaluate (a metric this model does not have) are dropped by keeping only
    the names hapi declares for this run.
    """
    items = dict(logs or {})
    if isinstance(names, (list, tuple)) and names:
        return {k: items[k] for k in names if k in items}
    return {k: v for k, v in items.items() if k not in _NOT_METRICS}


def _has_loss(names: Any) -> bool:
    """Whether hapi declares a loss for this run (a stale 'loss' can linger in its shared logs)."""
    return not isinstance(names, (list, tuple)) or "loss" in names


def _broadcast(value: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's value on every rank."""
    if _world_size() <= 1:
        return value
    box = [value]
    paddle.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _read_resume(prefix: str, epoch: int | None, mid_epoch: bool | None = None) -> _Resume:
    """The .pdopt of a training_state (loaded once, for `_restore`) and the callback state it holds."""
    optimizer: dict[str, Any] | None = None
    state: dict[str, Any] = {}
    if os.path.exists(prefix + ".pdopt"):
        optimizer = paddle.load(prefix + ".pdopt")
        optimizer.pop(_NAME_TABLE, None)
        state = dict(optimizer.pop(STATE_KEY, None) or {})
    if not state and os.path.exists(prefix + STATE_SUFFIX):  # saved by version 1 of this callback
        with open(prefix + STATE_SUFFIX, encoding="utf-8") as f:
            state = json.load(f)
        if os.path.exists(prefix + RNG_SUFFIX):
            with open(prefix + RNG_SUFFIX, "rb") as f:
                state["rng"] = f.read()
    if mid_epoch is None:
        mid_epoch = bool(state.get("mid_epoch", False))
    if epoch is None:
        epoch = state.get("epoch")
    if epoch is None:
        log.warning(
            "%s.pdparams does not say which epoch it ends (its .pdopt has no %r); its state is loaded and "
            "fit() counts from epoch 0",
            prefix,
            STATE_KEY,
        )
        epoch, mid_epoch = -1, False
    return _Resume(prefix=prefix, epoch=int(epoch), state=state, mid_epoch=mid_epoch, optimizer=optimizer)


def _name_table(path: str) -> dict[str, str]:
    """paddle.save's structured -> unique parameter name table (paddle.load drops it), for checkpoints
    written by Model.save itself rather than by this callback."""
    try:
        with open(path, "rb") as f:
            table = pickle.load(f, encoding="latin1").get(_NAME_TABLE)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):  # not a plain pickle
        return {}
    return dict(table) if isinstance(table, Mapping) else {}


def _rename_optimizer_state(state: Mapping[str, Any], saved_names: Mapping[str, str], model: Any) -> dict[str, Any]:
    """Optimizer state keyed for this process's parameters.

    Keys are `<parameter unique name>_<accumulator>_<n>`, and unique names come from
    process-wide counters: the same network built second in a process is `linear_2`,
    not `linear_0`. Keys are mapped through the structured names saved with the
    checkpoint, and the counter suffix is the one this optimizer will use.
    """
    current = {name: p.name for name, p in model.network.named_parameters()}
    renames = {old: current[name] for name, old in saved_names.items() if name in current}
    if not renames:
        return dict(state)
    optimizer = model._optimizer
    olds = sorted(renames, key=len, reverse=True)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, Mapping):
            out[key] = {renames.get(k, k): v for k, v in value.items()}
            continue
        new_key = key
        tail = ""
        base = key
        if base.endswith(".SCALE_VALUE"):
            base, tail = base[: -len(".SCALE_VALUE")], ".SCALE_VALUE"
        for old in olds:
            if base.startswith(old + "_"):
                rest = base[len(old) + 1 :]
                head, _, counter = rest.rpartition("_")
                accumulator = head if counter.isdigit() and head else rest
                new_key = _accumulator_name(optimizer, renames[old], accumulator) + tail
                break
        out[new_key] = value
    return out


def _accumulator_name(optimizer: Any, param_name: str, accumulator: str) -> str:
    """The name this optimizer gives (or gave) the accumulator of a parameter."""
    existing = getattr(optimizer, "_accumulators", {}).get(accumulator, {}).get(param_name)
    if existing is not None:
        return str(existing.name)
    base = f"{param_name}_{accumulator}"
    try:
        from paddle.base import unique_name

        generator = unique_name.generator
        return f"{generator.prefix}{base}_{generator.ids.get(base, 0)}"
    except (ImportError, AttributeError):
        return f"{base}_0"
