"""PyTorch Lightning adapter: `BestCheckpoint`, a `ModelCheckpoint` driven by the shared policy.

    from checkpoint_hooks.lightning import BestCheckpoint
    trainer = Trainer(callbacks=[BestCheckpoint(monitor="val_loss")])
    trainer.fit(model)      # run the same script again after a crash: it continues

The class derives from the `ModelCheckpoint` of every Lightning namespace installed
(`lightning.pytorch` and `pytorch_lightning`), so one class works with either Trainer,
is found as `trainer.checkpoint_callback`, and keeps Lightning from adding its own.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import IO, Any, cast

import numpy as np
import torch

from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.durable import DurableFile
from checkpoint_hooks.core.engine import TRAINING_STATE, Engine, Plan, SaveItem
from checkpoint_hooks.core.errors import CheckpointError, MonitorError
from checkpoint_hooks.core.store import is_url
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, load_policy

log = logging.getLogger("checkpoint_hooks")

EXTENSIONS = {"training_state": ".ckpt", "weights": ".weights.pt", "model": ".model.pt"}
RNG_KEY = "checkpoint_hooks_rng"


def _model_checkpoint_bases() -> tuple[type, ...]:
    bases = []
    for module in ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks"):
        try:
            bases.append(__import__(module, fromlist=["ModelCheckpoint"]).ModelCheckpoint)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "checkpoint_hooks.lightning needs PyTorch Lightning: pip install 'checkpoint-hooks[lightning]'"
        )
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


def _collect_rng() -> dict[str, Any]:
    version, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # a tensor, not an ndarray: Lightning loads checkpoints with weights_only=True
        "numpy": (version, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
    }


def _restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    return value


_crc32_lock = threading.Lock()
_crc32_users = 0
_crc32_before = True


@contextmanager
def _without_torch_crc32() -> Iterator[None]:
    """torch.save skips the CRC32 of its zip records while the block runs.

    That CRC costs 0.3-0.6 s per GiB here (benchmarks/save_throughput.py), while our xxh3 checksum
    of the file covers the same bytes, and torch.load does not check it. torch.load, Lightning's
    restore and fit(ckpt_path=...) load such files (tests/lightning/test_resume_overlap.py); zip
    tools report the records' CRC as wrong. The option is process-wide: a torch.save on another
    thread meanwhile skips it too.
    """
    global _crc32_users, _crc32_before
    getter = getattr(torch.serialization, "get_crc32_options", None)
    setter = getattr(torch.serialization, "set_crc32_options", None)
    if getter is None or setter is None:  # torch < 2.4 always computes it
        yield
        return
    with _crc32_lock:
        if _crc32_users == 0:
            _crc32_before = getter()
            setter(False)
        _crc32_users += 1
    try:
        yield
    finally:
        with _crc32_lock:
            _crc32_users -= 1
            if _crc32_users == 0:
                setter(_crc32_before)


def save_torch(obj: Any, path: str, checksum: bool = True) -> None:
    """`torch.save(obj, path)` through a DurableFile: hashed as it is written, its writeback started early.

    Args:
        obj: what to save.
        path: the file to write.
        checksum: whether the engine checksums the file (the policy's `verify`); then torch's own
            zip CRC32 is skipped, as the checksum covers every byte of the file.
    """
    with _without_torch_crc32() if checksum else nullcontext(), DurableFile(path) as f:
        torch.save(obj, cast(IO[bytes], f))  # a binary file object, as torch.save asks


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


class _SnapshotBuffers:
    """Copies of a state's tensors in host memory, in tensors kept from one save to the next.

    Reusing them spares the copy the page faults of fresh allocations (`core.buffers`);
    `Engine.execute_async` recycles `kept` before each snapshot and lets it go at close.
    """

    def __init__(self) -> None:
        self.kept: HostBuffers[torch.Tensor] = HostBuffers(_empty_host_tensor)

    def copy(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            buffer = self.kept.take(tuple(value.shape), value.dtype)
            buffer.copy_(value.detach())
            return buffer
        if isinstance(value, dict):
            copied = {k: self.copy(v) for k, v in value.items()}
            out: dict[Any, Any] = OrderedDict(copied) if isinstance(value, OrderedDict) else copied
            if hasattr(value, "_metadata"):  # state_dict versions, read back by load_state_dict
                out._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
            return out
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self.copy(v) for v in value)
        return copy.deepcopy(value)  # numbers, strings, RNG states: small, and they change as training goes on


def _empty_host_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cpu")


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
        self._engine: Engine | None = None
        self._trainer: Any = None
        self._pending_rng: list[Any] | None = None
        self._validated_epoch = -1
        self._ever_validated = False
        self._missing_warned = False
        self._model_warned = False
        self._buffers = _SnapshotBuffers()
        self._restoring = False

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> BestCheckpoint:
        """A callback from a YAML policy file; keyword arguments override its fields."""
        return cls(policy=os.fspath(path), **overrides)

    @property
    def engine(self) -> Engine | None:
        return self._engine

    # -- setup and resume -------------------------------------------------------------

    def _resolve_dirpath(self, trainer: Any) -> str:
        dirpath = self.policy.dirpath
        if not self._dirpath_given and not is_url(dirpath) and not os.path.isabs(dirpath):
            dirpath = os.path.join(trainer.default_root_dir, dirpath)
        return dirpath

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if self._engine is not None:
            self._engine.close()
        dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        policy = self.policy.model_copy(update={"dirpath": dirpath})
        self._engine = Engine(policy, extensions=EXTENSIONS, is_writer=trainer.is_global_zero)
        self.dirpath = self._engine.directory.url
        self._engine.open()
        self._validated_epoch, self._ever_validated = -1, False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        engine = self._engine
        if engine is None:
            return
        if trainer.ckpt_path is None:
            if self.policy.resume == "auto":
                self._resume_newest(trainer, engine)
            else:
                path = self._choose_resume(engine) if trainer.is_global_zero else None
                path = trainer.strategy.broadcast(path)
                if path:
                    self._restore(trainer, path, chosen=False)
        if not engine.run_decided:
            engine.start_fresh()  # the user's own ckpt_path, or one not in this directory
        if self._pending_rng:
            # Last thing before the first epoch's data loader draws its shuffling seed.
            states = self._pending_rng
            _restore_rng(states[trainer.global_rank] if trainer.global_rank < len(states) else states[0])
            self._pending_rng = None
        self._sync(trainer)

    def _restore(self, trainer: Any, path: str, chosen: bool) -> None:
        """Load a checkpoint into the model and the callbacks (and, right after on_fit_start, the loops).

        Lightning resolves ckpt_path before any callback runs; on_fit_start is the one place a
        callback can still hand it a checkpoint: the Trainer restores loops, optimizers and
        schedulers from it right after on_fit_start. A checkpoint `chosen` by automatic resume is
        adopted once it verifies, not by load_state_dict while it loads.
        """
        self._restoring = chosen
        try:
            trainer._checkpoint_connector._restore_modules_and_callbacks(path)
        finally:
            self._restoring = False

    def _resume_newest(self, trainer: Any, engine: Engine) -> None:
        """Restore the newest resumable checkpoint, verifying its checksum while Lightning loads it.

        Verifying first and loading after reads the file twice in a row; in parallel the two readers share
        the page cache (and a single read from disk when it is cold). If the checksum fails (whether the load raised or not), the previous
        checkpoint is restored instead: a full restore sets the model, optimizers, schedulers, loops and
        callbacks again, so nothing of the bad one remains. A load error of a checkpoint that verifies is
        raised. Under several processes rank zero verifies and tells the others to go on or to load the next.
        """
        candidates = iter(engine.resume_candidates() if trainer.is_global_zero else [])
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint_hooks-verify") as verifier:
            while True:
                record = next(candidates, None)
                path, check = None, None
                if record is not None:
                    try:
                        path = engine.local_path(record)  # a download from a remote store
                        check = verifier.submit(engine.problems, record)
                    except OSError:
                        problems = engine.problems(record)
                        if not problems:
                            raise
                        engine.warn_skipped(record, problems)
                        continue
                path = trainer.strategy.broadcast(path)
                if not path:
                    return
                error: Exception | None = None
                try:
                    self._restore(trainer, path, chosen=True)
                except Exception as exc:
                    error = exc
                problems = check.result() if check is not None else []
                if trainer.strategy.broadcast(not problems):
                    if error is not None:
                        raise error
                    if record is not None:
                        engine.adopt(record)
                    return
                if record is not None:
                    engine.warn_skipped(record, problems)
                # the next load replaces everything; drop the bad one's tensors before it
                trainer._checkpoint_connector._loaded_checkpoint = {}

    def _choose_resume(self, engine: Engine) -> str | None:
        """The checkpoint `resume` names (a path), or None for `resume="never"`."""
        resume = self.policy.resume
        if resume == "never":
            return None
        record = engine.find_record(resume)
        if record is not None:
            engine.adopt(record, discard_newer=False)
            return engine.local_path(record)
        if not os.path.exists(resume) and not is_url(resume):
            raise PolicyError(f"resume points at a checkpoint that does not exist. Received: resume={resume!r}")
        return resume

    # -- saving -----------------------------------------------------------------------

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch
            self._ever_validated = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        engine = self._engine
        if engine is None or (self.policy.every_n_steps is None and self.policy.every_n_minutes is None):
            return
        due = None
        if trainer.is_global_zero:
            # the epoch end right after the last batch saves a training state anyway
            at_epoch_end = self.policy.last and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            due = not at_epoch_end and (engine.step_due(trainer.global_step) or engine.time_due())
        if trainer.strategy.broadcast(due):
            self._save_training_state(trainer, pl_module, preempted=False)

    def _save_training_state(self, trainer: Any, pl_module: Any, preempted: bool) -> None:
        """A mid-epoch training_state (Lightning's loops restore mid-epoch progress from it)."""
        assert self._engine is not None
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        plan = None
        if trainer.is_global_zero:
            plan = self._engine.plan_training_state(
                trainer.current_epoch, trainer.global_step, {k: v for k, v in metrics.items() if v is not None},
                mid_epoch=True, preempted=preempted,
            )
        plan = trainer.strategy.broadcast(plan)
        # in the foreground: a save on preemption must be on disk before the process ends
        self._execute(self._engine, plan, trainer, pl_module, background=not preempted)
        self._sync(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # the rolling last was saved at the final epoch end; a background save of it finishes here
        if self._engine is not None:
            self._engine.wait()
            self._sync(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        engine = self._engine
        if engine is None or trainer.sanity_checking:
            return
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        metrics = {k: v for k, v in metrics.items() if v is not None}
        monitor = self.policy.monitor
        if monitor is not None:
            if monitor not in metrics:
                self._missing_monitor(trainer, metrics)
            elif self._ever_validated and self._validated_epoch != trainer.current_epoch:
                # Validation skipped this epoch: its values are from an earlier one, so do not rank them.
                metrics.pop(monitor)
        plan = engine.plan(trainer.current_epoch, trainer.global_step, metrics) if trainer.is_global_zero else None
        plan = trainer.strategy.broadcast(plan)
        if plan:
            self._execute(engine, plan, trainer, pl_module)
        self._sync(trainer)

    def _missing_monitor(self, trainer: Any, metrics: Mapping[str, Any]) -> None:
        assert self._engine is not None
        try:
            self._engine.require_monitor(metrics)
        except MonitorError as exc:
            if trainer.fit_loop.epoch_loop.val_loop._has_run:
                raise
            if not self._missing_warned:
                self._missing_warned = True
                log.warning("%s; skipping top-k until it appears", exc)

    def _execute(self, engine: Engine, plan: Plan, trainer: Any, pl_module: Any, background: bool = True) -> None:
        checksum = self.policy.verify
        if background and self.policy.async_save and all(item.format != "model" for item in plan.items):
            engine.execute_async(
                plan,
                lambda item: self._snapshot(item, trainer, pl_module),
                lambda item, state, path: save_torch(state, path, checksum),
                self._buffers.kept,
            )
            return

        def write(item: SaveItem, path: str) -> None:
            if item.format == TRAINING_STATE:
                self._save_checkpoint(trainer, path)  # every rank: the strategy gathers state, rank zero writes
            elif trainer.is_global_zero:
                if item.format == "weights":
                    save_torch(pl_module.state_dict(), path, checksum)
                else:
                    if not self._model_warned:
                        self._model_warned = True
                        log.warning(
                            "format='model' pickles the %s class: loading needs that class importable at the "
                            "same module path, and torch.load(..., weights_only=False)",
                            type(pl_module).__name__,
                        )
                    save_torch(pl_module, path, checksum)

        engine.execute(plan, write)

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

    def _snapshot(self, item: SaveItem, trainer: Any, pl_module: Any) -> Any:
        """What `write` would save, copied into host memory the background save owns (async_save)."""
        if item.format == TRAINING_STATE:
            state = trainer._checkpoint_connector.dump_checkpoint(False)  # every rank, as save_checkpoint does
            trainer.strategy.barrier("BestCheckpoint.snapshot")
        else:
            state = pl_module.state_dict()
        return self._buffers.copy(state) if trainer.is_global_zero else None

    # -- ModelCheckpoint's public attributes ---------------------------------------------

    def _sync(self, trainer: Any) -> None:
        """Mirror the engine's view into ModelCheckpoint's attributes, identical on every rank."""
        summary = None
        if trainer.is_global_zero and self._engine is not None:
            engine = self._engine
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
        if manifest is None:
            return set()
        resumable = [r for r in manifest.records if r.format == TRAINING_STATE]
        if not resumable:
            return set()
        newest = max(resumable, key=lambda r: r.seq)
        return {directory.store.join(newest.primary_path)}

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = self._engine.state_dict() if self._engine is not None and self._engine.is_writer else {}
        state["monitor"] = self.policy.monitor
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._engine is not None and not self._restoring:
            self._engine.load_state_dict(state_dict)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states: list[Any] = [None] * trainer.world_size
        mine = _collect_rng()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        checkpoint[RNG_KEY] = states

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get(RNG_KEY)

    # -- end --------------------------------------------------------------------------

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        try:
            if self._should_save_on(trainer, exception):
                log.warning("%s stopped training; saving a training state to resume from", type(exception).__name__)
                self._save_training_state(trainer, pl_module, preempted=True)
        finally:
            self._close()

    def _should_save_on(self, trainer: Any, exception: BaseException) -> bool:
        """SIGTERM (Lightning's SIGTERMException), Ctrl-C or an error escaping fit(), once training began.

        Not for errors of the checkpointing itself. Under several processes only for SIGTERM,
        which every rank receives; a save after an error on one rank would wait for the others forever.
        """
        engine = self._engine
        if not self.policy.save_on_preemption or engine is None or not engine.run_decided:
            return False
        if isinstance(exception, (CheckpointError, PolicyError)) or trainer.global_step == 0:
            return False
        sigterm = type(exception).__name__ == "SIGTERMException"
        return bool(sigterm or trainer.world_size == 1)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def __repr__(self) -> str:
        return f"BestCheckpoint(monitor={self.policy.monitor!r}, dirpath={self.policy.dirpath!r}, top_k={self.policy.top_k})"
