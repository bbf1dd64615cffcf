"""`Checkpointer`: the shared policy for hand-written PyTorch training loops.

    from checkpoint_hooks.torch import Checkpointer

    with Checkpointer(model, optimizer, scheduler=scheduler, monitor="val_loss", dirpath="ckpt", top_k=3) as ckpt:
        for epoch in ckpt.epochs(20):    # restores model, optimizer, scheduler, RNG; yields the remaining epochs
            for batch in loader:
                ...; optimizer.step()
                ckpt.step()              # optional: step/time triggers and SIGTERM save points
            ckpt.epoch_end(val_loss=val_loss)
    print(ckpt.best_model_path)

Run the same script again after a crash and it continues after the last saved epoch. A
`training_state` (the default) is a `.pt` file holding `{"model", "optimizer", "scheduler",
"checkpoint_hooks"}` that `torch.load(path, weights_only=True)` reads; `weights` is
`model.state_dict()`, `model` is `torch.save(model)` (it pickles the class). The random
states of Python, NumPy and torch (every CUDA device too) are saved with every training
state and restored before the first epoch, so a resumed run draws the same dropout masks
and shuffling orders as an uninterrupted one.

Under DDP (`torch.distributed` initialized) rank zero writes; the others load the same
checkpoint. With `format="sharded"` (FSDP2, DTensor) every rank writes its shards through
`torch.distributed.checkpoint` into one folder and loads its part back, on any world size
(`checkpoint_hooks.torch.sharded`). A SIGTERM is acted on at the next `step()` or epoch boundary: a training state
tagged `preempted` is saved and the signal then ends the process. Inside `with ckpt:` an
exception escaping the loop saves one too (a plain `for` loop cannot tell an exception
from a `break`). A mid-epoch checkpoint (`every_n_steps`) restarts its epoch from the first
batch.

With `async_save=True` the training thread only copies the state and a worker thread writes it.
Tensors on a GPU are cloned on the device when that leaves at least 10% of its free memory free,
and the worker copies the clones into pinned host memory; otherwise they are copied into pinned
host memory asynchronously and the worker waits for that copy (`torch.io.SnapshotBuffers`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import torch

from checkpoint_hooks.core.engine import TRAINING_STATE, SaveItem
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.framework import ResumePoint
from checkpoint_hooks.core.planner import SHARDED
from checkpoint_hooks.core.resume_state import ResumeState, read
from checkpoint_hooks.core.session import FitSession, KeptCheckpoints
from checkpoint_hooks.core.store import is_url
from checkpoint_hooks.policy import CheckpointPolicy, load_policy
from checkpoint_hooks.torch.io import (
    SnapshotBuffers,
    save_torch,
    set_torch_rng_state,
    state_mismatch,
    torch_rng_state,
)

__all__ = ["Checkpointer"]

log = logging.getLogger("checkpoint_hooks")

EXTENSIONS = {TRAINING_STATE: ".pt", "weights": ".weights.pt", "model": ".model.pt", SHARDED: ".dcp"}
STATE_KEY = "checkpoint_hooks"


def _holds_dtensors(module: torch.nn.Module) -> bool:
    """Whether `module` has sharded (DTensor) parameters: FSDP2 `fully_shard`, tensor parallel."""
    loaded = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    return loaded is not None and any(isinstance(p, loaded.DTensor) for p in module.parameters())


def _sharded() -> Any:
    """The `sharded` module, imported on first use (torch.distributed.checkpoint takes half a second)."""
    from checkpoint_hooks.torch import sharded

    return sharded


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _Torch:
    """The `Framework` of a plain PyTorch loop: what the Checkpointer was given, saved and loaded."""

    name = "PyTorch"
    extensions = EXTENSIONS
    default_format = TRAINING_STATE
    resumable_formats = frozenset({TRAINING_STATE, SHARDED})
    epoch_base = 0
    resumes_mid_epoch = False  # the loop over batches is the user's: it cannot be entered half-way
    index_beside = False
    handles_sigterm = False
    broadcasts = True
    reads_folder_urls = True  # every rank loads its part of a sharded checkpoint on a remote store from there
    verified_before_load = (".metadata",)  # DCP unpickles it: checked before a sharded checkpoint is loaded

    def __init__(self, owner: Checkpointer) -> None:
        self.owner = owner
        self.copies = SnapshotBuffers()
        self.buffers = self.copies.kept
        self.start = 0
        self.stop = False
        self._model_warned = False
        self._group: Any = None  # the process group of background saves' collectives, made when first needed
        self._apart = threading.local()  # .group: the group of this thread's collectives (None: the default one)

    @contextlib.contextmanager
    def background_collectives(self) -> Iterator[None]:
        """This thread's collectives go through a process group of their own, apart from training's."""
        previous = getattr(self._apart, "group", None)
        self._apart.group = self._group
        try:
            yield
        finally:
            self._apart.group = previous

    def _collective_group(self) -> Any:
        return getattr(self._apart, "group", None)

    def is_writer(self) -> bool:
        return not _distributed() or torch.distributed.get_rank() == 0

    def world_size(self) -> int:
        return torch.distributed.get_world_size() if _distributed() else 1

    def rank(self) -> int:
        return torch.distributed.get_rank() if _distributed() else 0

    def broadcast(self, value: Any) -> Any:
        if not _distributed() or torch.distributed.get_world_size() == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self._collective_group())
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        if not _distributed():
            return flag
        group = self._collective_group()
        # NCCL reduces only CUDA tensors (object collectives move their bytes by themselves)
        device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend(group) == "nccl" else "cpu"
        box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(box.item())

    def _state(self, item: SaveItem) -> Any:
        owner = self.owner
        if _holds_dtensors(owner.network):
            raise CheckpointError(
                f"{type(owner.network).__name__} holds sharded (DTensor) parameters, which format={item.format!r} "
                "cannot save from one rank; use format='sharded'"
            )
        if item.format == "weights":
            return owner.network.state_dict()
        if item.format == "model":
            return owner.network
        state: dict[str, Any] = {"model": owner.network.state_dict()}
        if owner.optimizer is not None:
            state["optimizer"] = owner.optimizer.state_dict()
        state.update(self._extra(item))
        return state

    def _extra(self, item: SaveItem) -> dict[str, Any]:
        """What a training state holds besides model and optimizer: the scheduler and the resume payload."""
        extra: dict[str, Any] = {}
        if self.owner.scheduler is not None:
            extra["scheduler"] = self.owner.scheduler.state_dict()
        extra[STATE_KEY] = self.owner.session.payload(item, rng=self._gathered_rng()).to_dict()
        return extra

    def _gathered_rng(self) -> list[dict[str, Any]]:
        mine = self.owner.session.rng_state()
        if self.world_size() <= 1:
            return [mine]
        states: list[Any] = [None] * self.world_size()
        torch.distributed.all_gather_object(states, mine)
        return states

    def write(self, item: SaveItem, path: str) -> None:
        if item.format == SHARDED:
            self._write_sharded(item, path)
            return
        state = self._state(item)  # every rank: gathering the random states is a collective
        if not self.is_writer():
            return
        if item.format == "model" and not self._model_warned:
            self._model_warned = True
            log.warning(
                "format='model' pickles the %s class: loading needs that class importable at the same module "
                "path, and torch.load(..., weights_only=False)", type(self.owner.network).__name__
            )
        save_torch(state, path, self.owner.policy.verify)

    def _write_sharded(self, item: SaveItem, path: str, copied: tuple[dict[str, Any], dict[str, Any]] | None = None) -> None:
        """Every rank writes its shards: into the writer's staging folder (`path` on the writer), or for a
        remote store into its own `path`, which it uploads once the writer published its part.
        `copied`: the state and payload `snapshot` copied, for a save in the background."""
        owner = self.owner
        store = owner.session.engine.store if owner.session.engine is not None else None
        remote = store is not None and not store.is_local
        folder = path if remote else self.broadcast(path)
        upload = None
        if remote:
            assert store is not None and path.endswith(item.filename)
            root = path[: len(path) - len(item.filename)]  # where this rank's copy of the item lies

            def upload(names: list[str]) -> None:
                store.publish(root, [f"{item.filename}/{name}" for name in names])

        sharded = _sharded()
        if copied is None:
            state = sharded.training_state(owner.network, owner.optimizer)
            extra = self._extra(item)  # every rank: the random states are gathered
        else:
            state, extra = copied
        sync = owner.policy.fsync and not remote  # a remote store's local copy needs no flush
        sharded.save(
            state, extra, folder, sync=sync, checksums=owner.policy.verify, upload=upload, group=self._collective_group()
        )

    def can_snapshot(self, item: SaveItem) -> bool:
        return item.format != "model"  # a pickled module holds live references: it is written where it is

    def snapshot(self, item: SaveItem) -> Any:
        if item.format == SHARDED:  # every rank copies its shards
            if _distributed() and self._group is None:  # every rank, at the same save: made here, used in workers
                self._group = torch.distributed.new_group(backend="gloo")
            extra = copy.deepcopy(self._extra(item))  # the collective first: what only fails here follows it
            sharded = _sharded()
            return sharded.copy(sharded.training_state(self.owner.network, self.owner.optimizer)), extra
        state = self._state(item)
        return self.copies.copy(state) if self.is_writer() else None

    def write_snapshot(self, item: SaveItem, snapshot: Any, path: str) -> None:
        if item.format == SHARDED:
            with self.background_collectives():
                self._write_sharded(item, path, snapshot)
            return
        save_torch(self.copies.ready(snapshot), path, self.owner.policy.verify)

    def load(self, path: str) -> ResumeState | None:
        owner = self.owner
        if os.path.isdir(path) or (is_url(path) and path.endswith(EXTENSIONS[SHARDED])):  # every rank loads its part
            checkpoint: Any = _sharded().load(path, owner.network, owner.optimizer)
            self._load_extra(checkpoint)
            return read(checkpoint.get(STATE_KEY))
        if _holds_dtensors(owner.network):
            raise CheckpointError(
                f"{path} is a single-file training state, and {type(owner.network).__name__} holds sharded (DTensor) "
                "parameters; resume from a format='sharded' checkpoint, or start fresh with resume='never'"
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
            raise CheckpointError(
                f"{path} is not a training state of checkpoint_hooks.torch (a dict with 'model'); "
                "resume from one of its training_state checkpoints, or set resume='never'"
            )
        mismatch = state_mismatch(owner.network.state_dict(), checkpoint["model"])
        if mismatch is not None:
            raise CheckpointError(
                f"could not load {path} into this model: {mismatch}; the model differs from the one that saved it. "
                "Start fresh with resume='never' or another dirpath"
            )
        owner.network.load_state_dict(checkpoint["model"])
        if owner.optimizer is not None and "optimizer" in checkpoint:
            owner.optimizer.load_state_dict(checkpoint["optimizer"])
        self._load_extra(checkpoint)
        return read(checkpoint.get(STATE_KEY))

    def _load_extra(self, checkpoint: Mapping[str, Any]) -> None:
        if self.owner.scheduler is not None and "scheduler" in checkpoint:
            self.owner.scheduler.load_state_dict(checkpoint["scheduler"])

    def set_start(self, point: ResumePoint) -> None:
        self.start = point.start_epoch

    def request_stop(self) -> None:
        self.stop = True

    def rng_state(self) -> dict[str, Any]:
        return torch_rng_state()

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        set_torch_rng_state(state)


class Checkpointer(KeptCheckpoints):
    """Top-k best checkpoints, snapshots, a rolling last and automatic resume for a hand-written loop.

    Args:
        model: the module to save (a DistributedDataParallel wrapper is saved as its inner module).
        optimizer: its optimizer (saved and restored with training states).
        scheduler: an LR scheduler (likewise).
        policy: a `CheckpointPolicy`, a dict of its fields or a YAML file path.
        **policy_fields: any policy field (monitor, dirpath, top_k, snapshots, format, resume, ...);
            they override `policy`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scheduler: Any = None,
        policy: CheckpointPolicy | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        **policy_fields: Any,
    ) -> None:
        self.policy = load_policy(policy, **policy_fields)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._framework = _Torch(self)
        self.session = FitSession(self.policy, self._framework)
        self.global_step = 0
        self.epoch = -1
        self.resumed_from: ResumePoint | None = None
        self._epoch_ended = True
        self._guarded = False  # inside `with`: __exit__ decides what an early end of the loop means

    @property
    def network(self) -> torch.nn.Module:
        """The module whose state is saved: the model inside a DistributedDataParallel wrapper."""
        inner = getattr(self.model, "module", None)
        is_ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        return inner if is_ddp and isinstance(inner, torch.nn.Module) else self.model

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], model: torch.nn.Module, optimizer: Any = None, **kwargs: Any) -> Checkpointer:
        """A Checkpointer with the policy of a YAML file; keyword arguments override its fields."""
        return cls(model, optimizer, policy=os.fspath(path), **kwargs)

    def epochs(self, epochs: int) -> Iterator[int]:
        """Restore the newest checkpoint (per `resume`), then yield the epochs left of `range(epochs)`."""
        fw = self._framework
        fw.start, fw.stop = 0, False
        point = self.session.begin()
        self.resumed_from = point
        if point is not None:
            self.global_step = point.step
            self.session.restore_rng(point.state, torch.distributed.get_rank() if _distributed() else 0)
        finished = False
        try:
            for epoch in range(fw.start, epochs):
                if fw.stop:
                    break
                self.epoch, self._epoch_ended = epoch, False
                self.session.epoch_begin(epoch)
                yield epoch
                if not self._epoch_ended:
                    self.epoch_end()
                if self.session.stop_requested():
                    self.session.stop_for_preemption()
            finished = True
        finally:
            if finished:
                self.session.end()
            elif not self._guarded:
                self.session.end(failing=True)  # a break or an exception: without `with`, no way to tell
        if point is not None and fw.start >= epochs:
            log.info("training was already complete (%d epochs); best checkpoint: %s", epochs, self.best_model_path or "none")

    def step(self, **metrics: Any) -> None:
        """Count an optimizer step; a safe point for step/time triggers and SIGTERM.

        Args:
            **metrics: values a mid-epoch save records (e.g. the running loss).
        """
        self.global_step += 1
        self.session.batch_end(self.global_step, metrics=_scalars(metrics) if metrics else None)

    def epoch_end(self, **metrics: Any) -> None:
        """End the current epoch: save what the policy asks for, given the epoch's metrics (`val_loss=...`)."""
        if self.epoch < 0:
            raise CheckpointError("epoch_end() was called outside `for epoch in ckpt.epochs(n)`")
        self._epoch_ended = True
        values = _scalars(metrics)
        if self.policy.monitor is not None:
            self.session.check_monitor(values, strict=True)
        self.session.epoch_end(self.epoch, self.global_step, values)

    def __enter__(self) -> Checkpointer:
        self._guarded = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._guarded = False
        if exc is not None:
            self.session.on_exception(exc)  # saves a training state when the rules say so, then ends the fit
        else:
            self.session.end()  # a loop left with break

def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in metrics.items()}
