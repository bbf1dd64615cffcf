"""Paddle's files: host copies of what `paddle.save` pickles, reading a training state, optimizer keys, RNG.

A training_state is what `Model.save(prefix, training=True)` writes (`.pdparams`, `.pdopt`,
`.pdscaler` under AMP), with the resume payload under `STATE_KEY` of the `.pdopt`. Earlier
releases kept it there in another layout (version 2, with pickled random states) or in two
files beside the `.pdparams` (version 1); `read_training_state` reads all of them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
from collections.abc import Mapping
from copy import deepcopy
from typing import Any

import numpy as np
import paddle

from checkpoint_hooks.core.buffers import REUSE_MIN_BYTES, HostBuffers
from checkpoint_hooks.core.durable import DurableFile
from checkpoint_hooks.core.engine import SaveItem
from checkpoint_hooks.core.resume_state import ResumeState, read, set_host_rng_state
from checkpoint_hooks.paddle.safe_load import LEGACY_RNG_GLOBALS, check_pickle, paddle_load, unpickle_legacy_rng

log = logging.getLogger("checkpoint_hooks")

# Under this key of the .pdopt: the resume payload (`ResumeState.to_dict()`).
STATE_KEY = "checkpoint_hooks@@"
# Where version 1 kept it, in two more files beside the .pdparams (still read on resume).
STATE_SUFFIX = ".state.json"
RNG_SUFFIX = ".pdrng"
# paddle.save adds this table (structured -> unique parameter name) to every dict of tensors.
NAME_TABLE = "StructuredToParameterName@@"
PICKLE_PROTOCOL = 4  # paddle.save's default
# The fields of a paddle GeneratorState, in the order of its pickled state (CPU builds add the engine).
_GENERATOR_FIELDS = ("device", "seed", "offset", "engine")


def prefix_of(path: str) -> str:
    """The Model.save prefix of a training state's `.pdparams` (or of the prefix itself)."""
    return path.removesuffix(".pdparams")


# -- host copies ----------------------------------------------------------------------


class Serialized(bytes):
    """The bytes of a file, serialized on the training thread."""


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, paddle.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_holds_tensor(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(value) for value in obj)
    return False


def host_array(tensor: paddle.Tensor, buffers: HostBuffers[np.ndarray] | None) -> np.ndarray:
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


def host_copy(state: dict[str, Any], buffers: HostBuffers[np.ndarray] | None = None) -> Any:
    """What `paddle.save(state, path)` would pickle now, with every tensor copied to host memory.

    A state dict (tensors, and dicts without tensors) becomes paddle.save's own layout: numpy
    copies of the tensors, copies of the dicts, and the table of tensor names. Pickling it with
    protocol 4 later, on any thread, writes the bytes paddle.save writes. Anything else is
    serialized by paddle.save here. Tensors are copied into `buffers` when given, else into new arrays.
    """
    if all(isinstance(v, paddle.Tensor) or (isinstance(v, dict) and not _holds_tensor(v)) for v in state.values()):
        copy: dict[str, Any] = {}
        names: dict[str, str] = {}
        for key, value in state.items():
            if isinstance(value, paddle.Tensor):
                # a copy: training goes on changing the tensor in place
                copy[key] = host_array(value, buffers)
                names[key] = value.name
            else:
                copy[key] = deepcopy(value)  # e.g. the LR scheduler's state, which its next step changes
        copy[NAME_TABLE] = names
        return copy
    buffer = io.BytesIO()
    paddle.save(state, buffer)
    return Serialized(buffer.getvalue())


def save_files(item: SaveItem, files: Mapping[str, Any], path: str) -> None:
    """Write host copies ({suffix: copy}) beside `path` (a .pdparams), each hashed as it is written."""
    prefix = prefix_of(path)
    for suffix, copy in files.items():
        with DurableFile(prefix + suffix) as f:
            if isinstance(copy, Serialized):
                f.write(copy)
            else:
                pickle.dump(copy, f, protocol=PICKLE_PROTOCOL)


# -- reading a training state ---------------------------------------------------------


def read_training_state(prefix: str) -> tuple[dict[str, Any] | None, ResumeState | None, str]:
    """The optimizer state of a training state's `.pdopt` (None without one), its resume payload, and
    the file the payload's random states came from (named in messages).

    The payload key is taken out of the optimizer state; version 1's side files are read when
    the `.pdopt` holds none. Every file is checked before it is unpickled (`safe_load`).
    """
    optimizer: dict[str, Any] | None = None
    payload: Any = None
    source = prefix + ".pdopt"
    if os.path.exists(prefix + ".pdopt"):
        optimizer = paddle_load(prefix + ".pdopt")
        optimizer.pop(NAME_TABLE, None)
        payload = optimizer.pop(STATE_KEY, None)
    if not payload and os.path.exists(prefix + STATE_SUFFIX):
        with open(prefix + STATE_SUFFIX, encoding="utf-8") as f:
            payload = json.load(f)
        if os.path.exists(prefix + RNG_SUFFIX):
            source = prefix + RNG_SUFFIX
            with open(source, "rb") as f:
                payload["rng"] = f.read()
    state = read(payload)
    for rng in state.rng if state is not None else ():
        if isinstance(rng.get("paddle_pickle"), bytes):  # checked now, unpickled when the state is restored
            check_pickle(rng["paddle_pickle"], source, LEGACY_RNG_GLOBALS)
    return optimizer, state, source


def load_params(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The parameters of checked `.pdparams` bytes and paddle.save's structured -> unique name table.

    The table maps the optimizer keys of checkpoints that `Model.save` wrote itself (no
    payload with the names) onto this process's parameters.
    """
    params = paddle.load(io.BytesIO(data), keep_name_table=True)
    table = params.pop(NAME_TABLE, None)
    return params, dict(table) if isinstance(table, Mapping) else {}


def rename_optimizer_state(state: Mapping[str, Any], saved_names: Mapping[str, str], model: Any) -> dict[str, Any]:
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


# -- random states ----------------------------------------------------------------------


def paddle_rng_state() -> dict[str, Any]:
    """Paddle's generator states of the current device, as plain data.

    A `GeneratorState` offers only `current_seed()` to Python, and its pickled state: the
    device, the seed, the offset and (on CPU builds) the mt19937_64 engine as the text of its
    numbers, a list of character codes. That state is kept as plain fields, the engine as text.
    """
    states = []
    for generator in paddle.get_rng_state():
        try:
            fields = generator.__getstate__()
        except (AttributeError, TypeError):
            fields = None
        if not isinstance(fields, tuple):  # a build whose generators cannot be pickled either
            return {}
        states.append({
            name: bytes(value).decode("ascii") if name == "engine" else int(value)
            for name, value in zip(_GENERATOR_FIELDS, fields, strict=False)
        })
    return {"paddle": states}


def _generator_state(saved: Mapping[str, Any]) -> Any:
    """A GeneratorState from `paddle_rng_state`'s fields, made as unpickling makes one."""
    fields = [saved[name] for name in _GENERATOR_FIELDS if name in saved]
    if "engine" in saved:
        fields[-1] = list(str(saved["engine"]).encode("ascii"))
    kind = type(paddle.get_rng_state()[0])
    state = kind.__new__(kind)
    state.__setstate__(tuple(fields))
    return state


def set_paddle_rng_state(state: Mapping[str, Any], where: str) -> None:
    """Restore `paddle_rng_state`'s values, or the pickled states of version 1 and 2 files.

    A state saved on another device type is not restored (a warning says so).
    """
    legacy = state.get("paddle_pickle")
    saved: Any = state.get("paddle")
    if isinstance(legacy, bytes):
        # Versions 1 and 2 pickled {"paddle", "numpy", "python"}: checked like the files. Plain data since.
        old = unpickle_legacy_rng(legacy, where)
        set_host_rng_state({"python": old["python"], "numpy": old["numpy"]})
        saved = old["paddle"]
    elif not isinstance(saved, list) or not saved:
        return
    try:
        generators = saved if isinstance(legacy, bytes) else [_generator_state(s) for s in saved]
        paddle.set_rng_state(generators)
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:  # saved on another device type
        log.warning("could not restore Paddle's random state from %s: %s", where, exc)
