"""Load Paddle checkpoint files without running code planted in them.

`paddle.load` unpickles, and an unpickled file can call any importable function
(`os.system`, `builtins.eval`, ...). Checkpoint directories are shared (team buckets,
downloaded runs), so every file this adapter reads from one is checked first: its
bytes are read once, the pickle stream is walked with `pickletools.genops` without
executing it, and `paddle.load` (or `pickle.loads`) gets those same bytes only when
every global it names is one of these:

- `numpy.ndarray`, `numpy.dtype`, `numpy.core.multiarray._reconstruct` and
  `numpy._core.multiarray._reconstruct` (NumPy 1 and 2): the arrays that
  `paddle.save` turns every tensor of a state dict into;
- `numpy.core.multiarray.scalar` and `numpy._core.multiarray.scalar`: NumPy scalars,
  e.g. the best value of a ReduceOnPlateau schedule stepped with a NumPy metric;
- `builtins.tuple`: how `paddle.save` writes a tensor that sits in a nested dict
  (`(tuple, ((name, array),))`, e.g. an optimizer's `master_weights` under AMP O2).

That is the complete list of globals `paddle.save` (protocol 4, Paddle 2.x and 3.x)
writes for model, optimizer, LR scheduler and GradScaler state dicts and for the resume
payload of this adapter (plain dicts, lists, strings and numbers). The random states
that versions 1 and 2 of the payload pickled are read with one more allowed global,
`paddle.base.libpaddle.GeneratorState` (`LEGACY_RNG_GLOBALS`).

What paddle.save writes for these files is one plain pickle: `_legacy_save` pickles the
state dict with its name table, `_pickle_save` any other object; zip or tar containers
are not used, and safetensors or raw tensor files are written only on request (never by
`Model.save` or this adapter). A file that is not such a pickle is refused as well.

Refused, besides other globals: `STACK_GLOBAL` whose module and name are not the two
strings pushed right before it (directly or fetched from the memo by `BINGET`; anything
the walk cannot resolve statically), the extension registry (`EXT1`/`EXT2`/`EXT4`, which
names globals by number) and persistent ids. The bytes checked are the bytes loaded:
the file is not read a second time, so it cannot be swapped in between; this holds the
file in memory once more while it loads.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Iterator
from typing import Any

import numpy as np

from checkpoint_hooks.core.errors import CheckpointError

_NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray")

STATE_DICT_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "tuple")}
    | {(module, "_reconstruct") for module in _NUMPY}
    | {(module, "scalar") for module in _NUMPY}
)
LEGACY_RNG_GLOBALS: frozenset[tuple[str, str]] = STATE_DICT_GLOBALS | {("paddle.base.libpaddle", "GeneratorState")}

_STRING_PUSHES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_NO_STACK_EFFECT = frozenset({"PROTO", "FRAME"})
_FORBIDDEN = {
    "EXT1": "an extension-registry global",
    "EXT2": "an extension-registry global",
    "EXT4": "an extension-registry global",
    "PERSID": "a persistent id",
    "BINPERSID": "a persistent id",
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file's pickle would call something paddle.save never writes; it was not loaded."""


class _Unknown:
    """A stack value or memo entry the walk cannot know without running the pickle."""


_UNKNOWN = _Unknown()


def _refuse_value(source: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refused to use {source}: it holds {what}, which paddle.save never writes for a state dict; nothing "
        "of it was used (check where this checkpoint directory came from, or set resume='never')"
    )


def _refuse(source: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refused to load {source}: its pickle calls {what}, which paddle.save never writes for a state dict; "
        "the file was not loaded (check where this checkpoint directory came from, or set resume='never')"
    )


def pickle_globals(data: bytes, source: str) -> Iterator[tuple[str, str]]:
    """The globals the pickle stream in `data` names, as (module, name), in order; raises on what cannot be checked.

    Only the first pickle of `data` is walked: `pickle.load` stops at its STOP and reads no further.
    """
    memo: dict[int, object] = {}
    top: list[object] = []  # what the last two stack-changing opcodes pushed: a string, or _UNKNOWN
    try:
        for opcode, arg, _position in pickletools.genops(data):
            name = opcode.name
            if name in _FORBIDDEN:
                raise _refuse(source, _FORBIDDEN[name])
            if name in _NO_STACK_EFFECT:
                continue
            if name in _MEMO_PUTS:  # stores the top of the stack, which it leaves in place
                memo[len(memo) if name == "MEMOIZE" else _index(arg)] = top[-1] if top else _UNKNOWN
                continue
            if name in ("GLOBAL", "INST"):
                module, _, attribute = str(arg).partition(" ")
                yield module, attribute
            elif name == "STACK_GLOBAL":
                yield _stack_global(top, source)
            top.append(_pushed(name, arg, memo))
            del top[:-2]
    except ValueError as exc:  # genops: not a pickle, or a truncated one
        raise UnsafeCheckpointError(
            f"refused to load {source}: it is not the pickle paddle.save writes ({exc}); the file was not loaded"
        ) from None


def _index(arg: object) -> int:
    if not isinstance(arg, int):
        raise ValueError(f"memo index {arg!r} is not a number")
    return arg


def _pushed(name: str, arg: object, memo: dict[int, object]) -> object:
    """What opcode `name` leaves on top of the stack, when that is a known string; else _UNKNOWN."""
    if name in _STRING_PUSHES and isinstance(arg, str):
        return arg
    if name in _MEMO_GETS:
        return memo.get(_index(arg), _UNKNOWN)
    return _UNKNOWN  # any other opcode: its result, or whatever its pops left on top


def _stack_global(top: list[object], source: str) -> tuple[str, str]:
    """The (module, name) of a STACK_GLOBAL: the two strings the two opcodes right before it pushed."""
    module, attribute = top if len(top) == 2 else (_UNKNOWN, _UNKNOWN)
    if not (isinstance(module, str) and isinstance(attribute, str)):
        raise _refuse(source, "a global built from values that are not plain strings (it cannot be checked unrun)")
    return module, attribute


def check_pickle(data: bytes, source: str, allowed: frozenset[tuple[str, str]] = STATE_DICT_GLOBALS) -> None:
    """Raise UnsafeCheckpointError unless every global the pickle in `data` names is in `allowed`.

    A (module, name) pair is compared as a pair: `("numpy", "core.multiarray.scalar")` is not
    `("numpy.core.multiarray", "scalar")`, though both print alike.
    """
    for module, name in pickle_globals(data, source):
        if (module, name) not in allowed:
            raise _refuse(source, repr(f"{module}.{name}"[:120]))


def read_checked(path: str, allowed: frozenset[tuple[str, str]] = STATE_DICT_GLOBALS) -> bytes:
    """The bytes of the file at `path`, once they passed `check_pickle`."""
    with open(path, "rb") as f:
        data = f.read()
    check_pickle(data, os.fspath(path), allowed)
    return data


def paddle_load(path: str) -> Any:
    """`paddle.load(path)` of a state dict file, after the check; raises UnsafeCheckpointError before loading."""
    import paddle

    loaded = paddle.load(io.BytesIO(read_checked(path)))
    try:
        check_arrays(loaded, path)
    except RecursionError:
        raise _refuse_value(path, "nesting deeper than a state dict has") from None
    return loaded


_PLAIN_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex: what a state dict's arrays hold


def check_arrays(value: Any, source: str) -> None:
    """Refuse numpy values whose dtype is not a plain number (checked after loading, before any use).

    The globals above let a pickle rebuild a dtype and set its state: a structured dtype with an
    object field whose "holds objects" flag is cleared makes numpy take attacker bytes for a
    pointer, followed as soon as the value is used. Reading `.dtype` does not follow it.
    """
    if isinstance(value, dict):
        for item in value.values():
            check_arrays(item, source)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_arrays(item, source)
    elif isinstance(value, (np.ndarray, np.generic)):
        dtype = value.dtype
        if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in _PLAIN_KINDS:
            raise _refuse_value(source, f"an array of dtype {str(dtype)[:80]!r}, not a plain number")


def unpickle_legacy_rng(data: bytes, source: str) -> Any:
    """The random states versions 1 and 2 of the payload pickled, after the check with `LEGACY_RNG_GLOBALS`."""
    check_pickle(data, source, LEGACY_RNG_GLOBALS)
    return pickle.loads(data)
