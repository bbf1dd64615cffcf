"""The `Framework` of Paddle's hapi: what `FitSession` asks of a `paddle.Model` fit."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle

from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.engine import TRAINING_STATE, SaveItem
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.framework import ResumePoint
from checkpoint_hooks.core.resume_state import ResumeState
from checkpoint_hooks.paddle import io as paddle_io
from checkpoint_hooks.paddle.hapi import inference_extension
from checkpoint_hooks.paddle.io import STATE_KEY, host_copy, prefix_of
from checkpoint_hooks.paddle.safe_load import read_checked
from checkpoint_hooks.policy import PolicyError

if TYPE_CHECKING:
    from checkpoint_hooks.paddle import BestCheckpoint

log = logging.getLogger("checkpoint_hooks")


def rank() -> int:
    return int(paddle.distributed.get_rank())


def world_size() -> int:
    return int(paddle.distributed.get_world_size())


def check_shapes(path: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise one clear error when a saved tensor's shape is not that of the network's tensor of the same name.

    Paddle's set_state_dict only warns and leaves such a tensor out, which then reads as a missing key.
    """
    for name, tensor in current.items():
        value = saved.get(name)
        shape = getattr(value, "shape", None)
        if shape is None:
            continue
        if list(shape) != list(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit this network: {name} has shape {list(shape)} in the checkpoint and "
                f"{list(tensor.shape)} in the network (the model changed since it was saved); resume with the "
                "network it was saved from, set resume='never' to start over, or give another dirpath"
            )


@dataclass
class Loaded:
    """A training state read (and checked) at fit start, restored where its start epoch begins (hapi's
    fit() has no initial epoch). The files are read once: what is restored is what was checked."""

    prefix: str
    params: bytes  # the checked .pdparams
    optimizer: dict[str, Any] | None  # the .pdopt without the payload; None without a .pdopt
    state: ResumeState | None
    rng_source: str  # the file the random states came from
    scaler: bytes | None  # the checked .pdscaler, when there is one


class PaddleFramework:
    """What a fit of `BestCheckpoint` saves and loads: the paddle.Model it was given to."""

    name = "Paddle"
    default_format = TRAINING_STATE
    resumable_formats = frozenset({TRAINING_STATE})
    epoch_base = 0
    resumes_mid_epoch = False  # hapi's fit() cannot skip the batches of an epoch
    index_beside = False
    handles_sigterm = False
    broadcasts = True

    def __init__(self, owner: BestCheckpoint) -> None:
        self.owner = owner
        self.buffers: HostBuffers[np.ndarray] = HostBuffers(np.empty)  # what background saves copy the state into
        self.loaded: Loaded | None = None
        self._source = "the checkpoint"  # named in a warning when its random state cannot be restored

    @property
    def extensions(self) -> dict[str, str]:
        return {"weights": ".pdparams", "model": inference_extension(), TRAINING_STATE: ".pdparams"}

    # -- processes ----------------------------------------------------------------------

    def is_writer(self) -> bool:
        return rank() == 0

    def world_size(self) -> int:
        return world_size()

    def broadcast(self, value: Any) -> Any:
        if world_size() <= 1:
            return value
        box = [value]
        paddle.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any_rank(self, flag: bool) -> bool:
        if world_size() <= 1:
            return flag
        box = paddle.to_tensor([1 if flag else 0], dtype="int32")
        paddle.distributed.all_reduce(box, op=paddle.distributed.ReduceOp.MAX)
        return bool(box.numpy()[0])

    # -- saving -------------------------------------------------------------------------

    def write(self, item: SaveItem, path: str) -> None:
        if item.format == "model":
            if self.is_writer():
                self._write_model(path)
            return
        files = self._files(item)
        if files is not None:
            paddle_io.save_files(item, files, path)

    def can_snapshot(self, item: SaveItem) -> bool:
        return item.format != "model"  # paddle.jit.save runs on the training thread

    def snapshot(self, item: SaveItem) -> Any:
        return self._files(item, self.buffers)

    def write_snapshot(self, item: SaveItem, snapshot: Any, path: str) -> None:
        paddle_io.save_files(item, snapshot, path)

    def _files(self, item: SaveItem, buffers: HostBuffers[np.ndarray] | None = None) -> dict[str, Any] | None:
        """The files of a `weights` or `training_state` item as {suffix: host copy of what paddle.save pickles}.

        A training_state is what `Model.save(prefix, training=True)` writes, with the resume payload
        inside the .pdopt. Nothing in the result shares memory with the live tensors. None on the
        processes that do not write (they only hand over their random states).
        """
        rng = self._gathered_rng() if item.format == TRAINING_STATE else None  # a collective: every process
        if not self.is_writer():
            return None
        model = self.owner.hapi_model
        network = model.network
        files = {".pdparams": host_copy(network.state_dict(), buffers)}
        if item.format != TRAINING_STATE:
            return files
        optimizer = model._optimizer
        learning_rate = None
        if optimizer is not None and not isinstance(optimizer._learning_rate, paddle.optimizer.lr.LRScheduler):
            # A float rate is not in the optimizer state; ReduceLROnPlateau changes it.
            learning_rate = float(optimizer.get_lr())
        optimizer_state = dict(optimizer.state_dict()) if optimizer is not None else {}  # with LR_Scheduler
        optimizer_state[STATE_KEY] = self.owner.session.payload(
            item,
            rng=rng,
            # Optimizer keys embed process-wide unique parameter names; this maps them back on load.
            param_names={name: p.name for name, p in network.named_parameters()},
            learning_rate=learning_rate,
            world_size=world_size(),
        ).to_dict()
        files[".pdopt"] = host_copy(optimizer_state, buffers)
        scaler = getattr(model, "_scaler", None)
        if scaler is not None:
            scaler_state = scaler.state_dict()
            if scaler_state:
                files[".pdscaler"] = host_copy(scaler_state, buffers)
        return files

    def _gathered_rng(self) -> list[dict[str, Any]]:
        mine = self.owner.session.rng_state()
        if world_size() <= 1:
            return [mine]
        states: list[dict[str, Any]] = []
        paddle.distributed.all_gather_object(states, mine)
        return states

    def _write_model(self, path: str) -> None:
        model = self.owner.hapi_model
        network = model.network
        training = network.training
        network.eval()  # export inference behaviour (dropout off, batch norm statistics)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            model.save(path.removesuffix(os.path.splitext(path)[1]), training=False)
        finally:
            if training:
                network.train()
        if not os.path.exists(path):
            raise CheckpointError(f"paddle.jit.save wrote no {os.path.basename(path)}")

    # -- resuming -----------------------------------------------------------------------

    def load(self, path: str) -> ResumeState | None:
        """Read the training state at `path`; `restore` loads it into the model when its start epoch begins."""
        self.loaded = None
        prefix = prefix_of(path)
        if not os.path.exists(prefix + ".pdparams"):
            raise PolicyError(
                f"resume={path!r} is not a checkpoint: {prefix + '.pdparams'!r} does not exist; "
                "pass a training_state path, 'auto' or 'never'"
            )
        params = read_checked(prefix + ".pdparams")
        optimizer, state, rng_source = paddle_io.read_training_state(prefix)
        scaler = read_checked(prefix + ".pdscaler") if os.path.exists(prefix + ".pdscaler") else None
        if state is None or state.epoch is None:
            log.warning(
                "%s.pdparams does not say which epoch it ends (its .pdopt has no %r); its state is loaded and "
                "fit() counts from epoch 0",
                prefix,
                STATE_KEY,
            )
        self.loaded = Loaded(prefix, params, optimizer, state, rng_source, scaler)
        return state

    def set_start(self, point: ResumePoint) -> None:
        self.owner.start_epoch = point.start_epoch

    def restore(self) -> None:
        """Load the training state read at fit start into the network, optimizer, LR scheduler, scaler and RNG."""
        loaded, self.loaded = self.loaded, None
        if loaded is None:
            return
        model = self.owner.hapi_model
        prefix = loaded.prefix
        extra = loaded.state.extra if loaded.state is not None else {}
        params, table = paddle_io.load_params(loaded.params)
        names = extra.get("param_names") or table
        check_shapes(prefix + ".pdparams", params, model.network.state_dict())
        missing, unexpected = model.network.set_state_dict(params)
        if missing:
            raise CheckpointError(
                f"checkpoint {prefix}.pdparams does not fit this network: it lacks {', '.join(missing)}; "
                "resume with the network it was saved from, or set resume='never'"
            )
        if unexpected:
            log.warning("checkpoint %s.pdparams has entries this network lacks: %s", prefix, ", ".join(unexpected))
        optimizer = model._optimizer
        if optimizer is not None and loaded.optimizer:
            optimizer.set_state_dict(paddle_io.rename_optimizer_state(loaded.optimizer, names, model))
        learning_rate = extra.get("learning_rate")
        if (
            optimizer is not None
            and learning_rate is not None
            and not isinstance(optimizer._learning_rate, paddle.optimizer.lr.LRScheduler)
        ):
            optimizer.set_lr(float(learning_rate))
        scaler = getattr(model, "_scaler", None)
        if scaler is not None and loaded.scaler is not None:
            scaler.load_state_dict(paddle.load(io.BytesIO(loaded.scaler)))
        state = loaded.state
        # Files before the plain payload pickled rank 0's random states only: restored in a single process.
        legacy = state is not None and any("paddle_pickle" in r for r in state.rng)
        if state is not None and not (legacy and world_size() > 1):
            self._source = loaded.rng_source
            self.owner.session.restore_rng(state, rank())
        session = self.owner.session
        level = session.engine.level if session.engine is not None else logging.DEBUG
        log.log(level, "restored %s (epoch %s, step %d)", prefix, state.epoch if state else None, state.step if state else 0)

    def request_stop(self) -> None:
        self.owner._request_stop()

    # -- random states ------------------------------------------------------------------

    def rng_state(self) -> dict[str, Any]:
        return paddle_io.paddle_rng_state()

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        paddle_io.set_paddle_rng_state(state, self._source)
