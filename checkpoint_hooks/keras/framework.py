"""The `Framework` of Keras 3: how BestCheckpoint's session writes, copies and loads a model.

A resumable `.keras` file carries the resume payload (`FitSession.payload`: epoch,
step, random states, and the seed states of the model's SeedGenerators) as one
more member of its zip archive, `checkpoint_hooks.json`, which
`keras.saving.load_model` and `load_weights` pass over: a file beside it would cost
a hash and an fsync at each save. Files of earlier releases hold that member in
version 1's layout, or the state in a `<file>.state.json` beside it; both still load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import keras
import numpy as np

from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.engine import TRAINING_STATE, SaveItem
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.framework import ResumePoint
from checkpoint_hooks.core.resume_state import ResumeState, read
from checkpoint_hooks.keras import snapshot as keras_snapshot
from checkpoint_hooks.keras.arguments import KERAS_EXT, LEGACY_EXT, WEIGHTS_EXT
from checkpoint_hooks.keras.shapes import Mismatch, first_mismatch

log = logging.getLogger("checkpoint_hooks")

STATE_MEMBER = "checkpoint_hooks.json"  # in the zip of every resumable .keras: the resume payload
STATE_SUFFIX = ".state.json"  # where version 1 wrote that state, beside the file (still read)


class KerasFramework:
    """What BestCheckpoint's `FitSession` needs of Keras: the callback's model, written and loaded.

    Args:
        owner: the callback (its `model` and its `session`).
        legacy: models are legacy `.h5` files; they do not bring the optimizer back, so only
            training states (`.keras`) are resumable.
    """

    name = "Keras"
    default_format = "model"
    epoch_base = 1  # Keras numbers epochs from 1 in names and messages
    resumes_mid_epoch = False  # fit() cannot start an epoch at a given batch
    index_beside = False
    handles_sigterm = False
    broadcasts = False  # the other workers read the writer's choice of checkpoint from the directory

    def __init__(self, owner: Any, legacy: bool = False) -> None:
        self.owner = owner
        self.extensions = {"weights": WEIGHTS_EXT, "model": LEGACY_EXT if legacy else KERAS_EXT, TRAINING_STATE: KERAS_EXT}
        self.resumable_formats = frozenset({TRAINING_STATE} if legacy else {"model", TRAINING_STATE})
        self.buffers: HostBuffers[np.ndarray] = HostBuffers(np.empty)  # what background saves copy the state into
        self._moved_initial_epoch = False

    @property
    def model(self) -> Any:
        return self.owner.model

    # -- processes ----------------------------------------------------------------------

    def is_writer(self) -> bool:
        """Only the chief writes: every worker writing the same path is a known TensorFlow complaint."""
        strategy = getattr(self.model, "distribute_strategy", None)
        if strategy is not None:
            return bool(getattr(strategy.extended, "should_checkpoint", True))
        if keras.backend.backend() == "jax":
            with contextlib.suppress(Exception):
                from keras.src.backend.jax import distribution_lib

                return int(distribution_lib.process_id()) == 0
        return True

    def world_size(self) -> int:
        """The processes training together (multi-worker tf.distribute, multi-process JAX)."""
        extended = getattr(getattr(self.model, "distribute_strategy", None), "extended", None)
        in_multi_worker = getattr(extended, "_in_multi_worker_mode", None)
        if in_multi_worker is not None:
            with contextlib.suppress(Exception):
                if in_multi_worker():
                    return max(2, int(getattr(extended, "_num_workers", 2)))
        if keras.backend.backend() == "jax":
            with contextlib.suppress(Exception):
                from keras.src.backend.jax import distribution_lib

                return int(distribution_lib.num_processes())
        return 1

    def broadcast(self, value: Any) -> Any:
        return value  # nothing reaches the other workers: each decides for itself (`broadcasts`)

    def any_rank(self, flag: bool) -> bool:
        return flag  # each worker acts on its own SIGTERM

    # -- saving -------------------------------------------------------------------------

    def write(self, item: SaveItem, path: str) -> None:
        """Save one item in its format; a resumable one gets the resume payload as one more zip member."""
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
        if item.format in self.resumable_formats:
            # One more member of the .keras zip (its central directory is rewritten after it), not one more file.
            with zipfile.ZipFile(path, "a") as archive:
                archive.writestr(STATE_MEMBER, self._payload(item))

    def can_snapshot(self, item: SaveItem) -> bool:
        """Legacy .h5 files, or a Keras without the functions a snapshot reuses, are written on this thread."""
        return keras_snapshot.available() and self.extensions[item.format] != LEGACY_EXT

    def snapshot(self, item: SaveItem) -> keras_snapshot.Snapshot:
        """What `write` writes for `item`, held in memory."""
        snapshot = keras_snapshot.take(self.model, archive=item.format != "weights", buffers=self.buffers)
        if item.format in self.resumable_formats:
            snapshot.members[STATE_MEMBER] = self._payload(item)
        return snapshot

    def write_snapshot(self, item: SaveItem, snapshot: keras_snapshot.Snapshot, path: str) -> None:
        snapshot.write(path)

    def _payload(self, item: SaveItem) -> bytes:
        """The resume payload of `item`, as of now: the session's, with the model's seed states."""
        state = self.owner.session.payload(
            item,
            seed_states=[np.asarray(v.numpy()).tolist() for v in _seed_variables(self.model)],
            keras_version=keras.__version__,
            backend=keras.backend.backend(),
        )
        return json.dumps(state.to_dict()).encode()

    # -- resuming -----------------------------------------------------------------------

    def load(self, path: str) -> ResumeState | None:
        """Load weights and optimizer state in place, and the seed states; the file's resume payload."""
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            # An unbuilt optimizer skips its saved variables with only a warning (iterations stay 0).
            with _strategy_scope(model):
                optimizer.build(model.trainable_variables)
        try:
            model.load_weights(path)
        except Exception as exc:
            mismatch = first_mismatch(model, path)
            if mismatch is not None:
                raise shape_error(path, mismatch) from None  # the line says it all; Keras's lists every object
            raise load_error(path, exc) from exc
        state = read_state(path)
        seeds = _seed_variables(model)
        saved = state.extra.get("seed_states") if state is not None else None
        if isinstance(saved, list) and len(saved) == len(seeds):
            for variable, values in zip(seeds, saved):
                variable.assign(np.asarray(values, dtype=variable.dtype))
        elif seeds and saved is not None:
            log.warning(
                "%s holds %s seed states, the model has %d; dropout will not repeat the interrupted run exactly",
                os.path.basename(path),
                len(saved) if isinstance(saved, list) else "no",
                len(seeds),
            )
        return state

    def set_start(self, point: ResumePoint) -> None:
        if point.epoch is None:
            return  # the file does not say: training starts at fit()'s initial_epoch
        self.model._initial_epoch = point.start_epoch
        self._moved_initial_epoch = True

    def reset_start(self) -> None:
        """fit() keeps reading model._initial_epoch on every later call: leave it as it was found."""
        if self._moved_initial_epoch and self.model is not None:
            self.model._initial_epoch = None
        self._moved_initial_epoch = False

    def read_step(self) -> int:
        """The optimizer's step counter (a device sync: read where a save may follow)."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return 0
        value = optimizer.iterations
        # int() of a MirroredVariable raises; .numpy() works on every backend's variable.
        return int(np.asarray(value.numpy() if hasattr(value, "numpy") else value).item())

    def request_stop(self) -> None:
        self.model.stop_training = True

    def rng_state(self) -> dict[str, Any]:
        """Keras's global SeedGenerator (unseeded `keras.random` calls), and on the torch backend torch's generators."""
        state: dict[str, Any] = {}
        generator = _global_seed_generator()
        if generator is not None:
            state["keras_global_seed"] = np.asarray(generator.state.numpy()).tolist()
        if keras.backend.backend() == "torch":
            from checkpoint_hooks.torch.io import torch_rng_state

            state.update(torch_rng_state())
        return state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("keras_global_seed")
        if saved is not None:
            from keras.src.random.seed_generator import global_seed_generator

            variable = global_seed_generator().state
            variable.assign(np.asarray(saved, dtype=variable.dtype))
        if keras.backend.backend() == "torch":
            from checkpoint_hooks.torch.io import set_torch_rng_state

            set_torch_rng_state(state)


def _global_seed_generator() -> Any:
    """Keras's global SeedGenerator once something made it (None before: nothing drew from it)."""
    try:
        from keras.src.backend.common import global_state
        from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    except ImportError:  # a Keras without it: nothing to save
        return None
    return global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)


def shape_error(path: str, mismatch: Mismatch) -> CheckpointError:
    """One line naming the first variable whose shape changed since `path` was saved, and the ways out."""
    return CheckpointError(
        f"checkpoint {path} does not fit this model: {mismatch.name} has shape {mismatch.saved} in the checkpoint "
        f"and {mismatch.current} in the model (the model changed since it was saved); resume with the model it "
        "was saved from, set resume='never' to start over, or give another dirpath"
    )


def load_error(path: str, exc: Exception) -> CheckpointError:
    """`path` did not load for another reason: the first line of Keras's message (the rest lists its objects)."""
    first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if len(first_line) > 300:
        first_line = first_line[:297] + "..."
    return CheckpointError(
        f"could not load {path} into this model ({type(exc).__name__}: {first_line}); the model differs from the "
        "one that saved it. Start fresh with resume='never' or another dirpath"
    )


def read_state(path: str) -> ResumeState | None:
    """The resume payload a resumable checkpoint holds (or version 1 wrote beside it); None when there is none."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read(STATE_MEMBER))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        try:
            with open(path + STATE_SUFFIX, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
    return read(data)


def _seed_variables(model: Any) -> list[Any]:
    """The state variables of every SeedGenerator (dropout, noise layers); `.keras` files do not hold them."""
    found = []
    for layer in model._flatten_layers():
        for generator in getattr(layer, "_seed_generators", ()):
            found.append(generator.state)
    return found


@contextlib.contextmanager
def _strategy_scope(model: Any) -> Iterator[None]:
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        yield
        return
    with strategy.scope():
        yield
