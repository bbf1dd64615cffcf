"""PyTorch file writing, host copies and random states, shared by the Lightning and plain PyTorch adapters."""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import IO, Any, Protocol, cast

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


# A snapshot clones a device's tensors on that device when they take at most this share of its
# free memory (at least 10% of it stays free): a device-to-device copy is the fastest way to free
# the training thread, and the worker copies the clones to host memory.
CLONE_SHARE_OF_FREE = 0.9


class DeviceCopies(Protocol):
    """What a snapshot asks of an accelerator: a seam the CPU tests drive with a fake device.

    An event is whatever `copy_async` returns; `wait` blocks the calling thread until it is done.
    """

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lives on this accelerator (its copies go through the other methods)."""

    def free_bytes(self, device: torch.device) -> int:
        """Bytes of the device's memory free for a clone now."""

    def clone(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` on its device, queued on the current stream."""

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor in page-locked memory, which the device copies into at full speed."""

    def mark(self, device: torch.device) -> Any:
        """An event after the work queued so far on the device's current stream (the clones)."""

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Any:
        """Queue `dst.copy_(src)`; an event after it.

        Without `after` the copy runs on the current stream, so work queued later waits for it
        (the source may change right after); with it, on a side stream once `after` is done.
        """

    def wait(self, event: Any) -> None:
        """Block the calling thread until `event` is done."""


class CudaCopies:
    """`DeviceCopies` for CUDA: clones on the current stream, worker copies on a side stream per device."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def owns(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cuda"

    def free_bytes(self, device: torch.device) -> int:
        return int(torch.cuda.mem_get_info(device)[0])

    def clone(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone()

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)

    def mark(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device).record_event()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Any:
        if after is None:
            dst.copy_(src, non_blocking=True)
            return torch.cuda.current_stream(src.device).record_event()
        stream = self._side_stream(src.device)
        stream.wait_event(after)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        return stream.record_event()

    def wait(self, event: Any) -> None:
        event.synchronize()

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """A stream of its own for the worker's copies: training kernels do not queue behind them."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return stream


class DeviceCopy:
    """A tensor on its way from an accelerator into a pinned host tensor.

    It pickles as that host tensor, waiting for the copy first: a snapshot written without
    `SnapshotBuffers.ready` still holds the values of snapshot time, only later.
    """

    __slots__ = ("after", "event", "host", "ops", "source")

    def __init__(self, ops: DeviceCopies, host: torch.Tensor, source: torch.Tensor | None = None, event: Any = None) -> None:
        self.ops = ops
        self.host = host
        self.source = source  # a device clone, copied to `host` in the worker
        self.after: Any = None  # the event after the clones, which the worker's copy waits for
        self.event = event  # the copy into `host`, queued

    def start(self) -> None:
        """Queue the copy of a clone into the host tensor (in the worker)."""
        if self.source is not None and self.event is None:
            self.event = self.ops.copy_async(self.host, self.source, after=self.after)

    def finish(self) -> torch.Tensor:
        """The host tensor, once the copy into it is done; the clone is let go."""
        self.start()
        self.settle()
        return self.host

    def settle(self) -> None:
        """Wait for a copy under way, if any, and let go of the clone."""
        if self.event is not None:
            self.ops.wait(self.event)
            self.event = None
        self.source = None

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.finish().__reduce_ex__(protocol)  # type: ignore[no-untyped-call]


class SnapshotBuffers:
    """Copies of a state's tensors in host memory, in tensors kept from one save to the next.

    Reusing them spares the copy the page faults of fresh allocations (`core.buffers`);
    the engine recycles `kept` before each background snapshot and lets it go at close
    (with it the pinned buffers and whatever device copies a failed save left).

    A CPU tensor is copied here, on the training thread. An accelerator's tensors (`device`)
    are cloned on the device when their bytes are at most `clone_share` of its free memory,
    and the worker copies the clones into pinned host tensors; otherwise they are copied into
    pinned host tensors asynchronously here. Either way the worker calls `ready(snapshot)`
    before writing it.

    Args:
        device: the accelerator's copies (default CUDA).
        clone_share: the share of a device's free memory its clones may take (0: never clone).
    """

    def __init__(self, device: DeviceCopies | None = None, clone_share: float = CLONE_SHARE_OF_FREE) -> None:
        if not 0.0 <= clone_share <= 1.0:
            raise ValueError(
                "clone_share is the share of a device's free memory a snapshot's clones may take: "
                f"use a number from 0 to 1. Received: {str(clone_share)[:40]}"
            )
        self.device: DeviceCopies = device if device is not None else CudaCopies()
        self.clone_share = clone_share
        self.pinned: HostBuffers[torch.Tensor] = HostBuffers(self._empty_pinned)
        self.kept: HostBuffers[torch.Tensor] = _KeptTensors(self)
        self.pending: list[DeviceCopy] = []  # this save's device copies, finished by `ready`

    def copy(self, value: Any) -> Any:
        """`value` with every tensor copied to host memory (an accelerator's: on its way, see `ready`)."""
        cloning = self._devices_with_room(value)
        started = len(self.pending)
        copied = _rebuild(value, lambda leaf: self._copy_leaf(leaf, cloning))
        self._mark_clones(self.pending[started:])
        return copied

    def ready(self, snapshot: Any) -> Any:
        """`snapshot` with its device copies done and host tensors in their place: the worker calls it before writing.

        A no-op for a snapshot of CPU tensors only.
        """
        if not self.pending:
            return snapshot
        for pending in self.pending:
            pending.start()  # every clone's copy queued before the first wait: they run back to back
        try:
            for pending in self.pending:
                pending.finish()
        finally:
            self.settle()
        return _rebuild(snapshot, lambda leaf: leaf.host if isinstance(leaf, DeviceCopy) else leaf)

    def settle(self) -> None:
        """Wait for every device copy under way and let go of the clones (a failed save may leave some)."""
        for pending in self.pending:
            pending.settle()

    def _empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.device.empty_pinned(shape, dtype)  # the device of now: a test may swap it

    def _mark_clones(self, copies: list[DeviceCopy]) -> None:
        """Give every clone the event after the last clone of its device: the worker's copy waits for it."""
        by_device: dict[torch.device, list[DeviceCopy]] = {}
        for pending in copies:
            if pending.source is not None:
                by_device.setdefault(pending.source.device, []).append(pending)
        for device, clones in by_device.items():
            after = self.device.mark(device)
            for clone in clones:
                clone.after = after

    def _devices_with_room(self, value: Any) -> set[torch.device]:
        """The devices whose tensors in `value` fit `clone_share` of their free memory."""
        if self.clone_share == 0.0:
            return set()
        needed: dict[torch.device, int] = {}
        for tensor in _tensors(value):
            if self.device.owns(tensor):
                needed[tensor.device] = needed.get(tensor.device, 0) + tensor.numel() * tensor.element_size()
        return {d for d, size in needed.items() if size <= self.clone_share * self.device.free_bytes(d)}

    def _copy_leaf(self, value: Any, cloning: set[torch.device]) -> Any:
        if not isinstance(value, torch.Tensor):
            return copy.deepcopy(value)  # numbers, strings, RNG states: small, and they change as training goes on
        if self.device.owns(value):
            return self._device_copy(value.detach(), cloning)
        buffer = self.kept.take(tuple(value.shape), value.dtype)
        buffer.copy_(value.detach())
        return buffer

    def _device_copy(self, tensor: torch.Tensor, cloning: set[torch.device]) -> DeviceCopy:
        host = self.pinned.take(tuple(tensor.shape), tensor.dtype)
        pending: DeviceCopy | None = None
        if tensor.device in cloning:
            try:
                pending = DeviceCopy(self.device, host, source=self.device.clone(tensor))
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since 2.5; this name since 1.13
                cloning.discard(tensor.device)  # the rest of this device's tensors take the slower way
                log.info("no room left on %s to clone a snapshot; copying its tensors to host memory instead", tensor.device)
        if pending is None:
            pending = DeviceCopy(self.device, host, event=self.device.copy_async(host, tensor))
        self.pending.append(pending)
        return pending


class _KeptTensors(HostBuffers[torch.Tensor]):
    """The host tensors the engine recycles and clears; the pinned ones and the device copies go along."""

    def __init__(self, owner: SnapshotBuffers) -> None:
        super().__init__(_empty_host_tensor)
        self._owner = owner

    def recycle(self) -> None:
        self._forget_device_copies()
        super().recycle()
        self._owner.pinned.recycle()

    def clear(self) -> None:
        self._forget_device_copies()
        super().clear()
        self._owner.pinned.clear()

    def _forget_device_copies(self) -> None:
        owner = self._owner
        owner.settle()  # no copy may still be writing into a pinned tensor that is handed out again
        owner.pending = []


def _rebuild(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value`'s dicts, lists and tuples rebuilt around `leaf(x)` of everything else."""
    if isinstance(value, dict):
        rebuilt = {k: _rebuild(v, leaf) for k, v in value.items()}
        out: dict[Any, Any] = OrderedDict(rebuilt) if isinstance(value, OrderedDict) else rebuilt
        if hasattr(value, "_metadata"):  # state_dict versions, read back by load_state_dict
            out._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_rebuild(v, leaf) for v in value)
    return leaf(value)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors `_rebuild` reaches in `value`."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        for v in value:
            yield from _tensors(v)


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
