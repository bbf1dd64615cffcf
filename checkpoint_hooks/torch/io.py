"""PyTorch file writing, host copies and random states, shared by the Lightning and plain PyTorch adapters."""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import IO, Any, cast

import torch

from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.durable import DurableFile
from checkpoint_hooks.core.resume_state import decode_bytes, encode_bytes

log = logging.getLogger("checkpoint_hooks")

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


class SnapshotBuffers:
    """Copies of a state's tensors in host memory, in tensors kept from one save to the next.

    Reusing them spares the copy the page faults of fresh allocations (`core.buffers`);
    the engine recycles `kept` before each background snapshot and lets it go at close.
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


def torch_rng_state() -> dict[str, Any]:
    """torch's CPU generator and, once CUDA is in use, the generator of every CUDA device, as text."""
    state: dict[str, Any] = {"torch": encode_bytes(torch.get_rng_state().numpy().tobytes())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["torch_cuda"] = [encode_bytes(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def set_torch_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `torch_rng_state`'s values (and the tensors or integer lists earlier releases saved)."""
    if "torch" in state:
        torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])
        else:
            log.warning(
                "the checkpoint holds the random states of %d CUDA device(s), this process sees %d; "
                "they are not restored", len(cuda), torch.cuda.device_count()
            )


def _byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.uint8)
    if isinstance(value, str):
        return torch.frombuffer(bytearray(decode_bytes(value)), dtype=torch.uint8)
    return torch.tensor(value, dtype=torch.uint8)


def state_mismatch(expected: Mapping[str, Any], saved: Mapping[str, Any]) -> str | None:
    """The first difference between a module's state dict and a saved one, in words; None when they fit."""
    for key, value in expected.items():
        if key not in saved:
            return f"the checkpoint lacks {key!r}"
        other = saved[key]
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
            return f"{key!r} is {list(other.shape)} in the checkpoint and {list(value.shape)} in this model"
    unexpected = [key for key in saved if key not in expected]
    return f"the checkpoint has {unexpected[0]!r}, which this model lacks" if unexpected else None
