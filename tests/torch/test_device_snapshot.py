"""Background snapshots of accelerator tensors, driven on CPU through a fake device, and CUDA random states.

`FakeDevice` stands where CUDA would (`checkpoint_hooks.torch.io.DeviceCopies`): it owns every
tensor, reports the free memory a test sets, and behaves like a stream: a queued copy reads its
source when it is queued and lands in the destination only at `wait`. Pinned buffers start as
zeros, so a file written before the wait holds zeros instead of the model's values.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
import torch

import checkpoint_hooks.torch as torch_adapter
from checkpoint_hooks.torch import Checkpointer
from checkpoint_hooks.torch.io import SnapshotBuffers
from tests.torch.test_checkpointer import train
from tests.torch.train_script import build

GiB = 1024**3


class Event:
    """A queued copy: its destination and the source's values when it was queued."""

    def __init__(self, dst: torch.Tensor, values: torch.Tensor) -> None:
        self.dst = dst
        self.values = values


class FakeDevice:
    """An accelerator in host memory, logging what ran on which thread."""

    def __init__(self, free: int, clones_before_oom: int | None = None) -> None:
        self.free = free
        self.clones_before_oom = clones_before_oom
        self.log: list[tuple[str, bool]] = []  # (what, on the training thread)
        self.clones: list[weakref.ref[torch.Tensor]] = []
        self.pinned: list[weakref.ref[torch.Tensor]] = []
        self.queued: list[Event] = []

    def _note(self, what: str) -> None:
        self.log.append((what, threading.current_thread() is threading.main_thread()))

    def owns(self, tensor: torch.Tensor) -> bool:
        return True

    def free_bytes(self, device: torch.device) -> int:
        return self.free

    def clone(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.clones_before_oom is not None and len(self.clones) >= self.clones_before_oom:
            raise torch.cuda.OutOfMemoryError("fake device full")
        self._note("clone")
        clone = tensor.clone()
        self.clones.append(weakref.ref(clone))
        return clone

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.zeros(shape, dtype=dtype)
        self.pinned.append(weakref.ref(buffer))
        return buffer

    def mark(self, device: torch.device) -> Any:
        self._note("mark")
        return "after the clones"

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Any = None) -> Event:
        self._note("copy_async")
        event = Event(dst, src.clone())
        self.queued.append(event)
        return event

    def wait(self, event: Event) -> None:
        self._note("wait")
        if event in self.queued:
            self.queued.remove(event)
            event.dst.copy_(event.values)

    def count(self, what: str, on_training_thread: bool) -> int:
        return sum(1 for name, main in self.log if name == what and main == on_training_thread)


def state() -> dict[str, Any]:
    return {"w": torch.arange(6.0).reshape(2, 3), "nested": [torch.ones(4, dtype=torch.int64), 3], "name": "x"}


@pytest.mark.parametrize("free", [GiB, 0], ids=["clone-when-room", "copy-when-no-room"])
def test_a_snapshot_holds_the_values_of_snapshot_time(free: int) -> None:
    device = FakeDevice(free)
    buffers = SnapshotBuffers(device)
    live = state()
    snapshot = buffers.copy(live)
    live["w"].add_(100)  # training goes on before the worker copies
    live["nested"][0].zero_()
    cloned = free > 0
    assert device.count("clone", True) == (2 if cloned else 0)
    assert device.count("copy_async", True) == (0 if cloned else 2)  # before `ready`: what the snapshot queued
    out = buffers.ready(snapshot)
    assert torch.equal(out["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(out["nested"][0], torch.ones(4, dtype=torch.int64))
    assert out["nested"][1] == 3 and out["name"] == "x"


def test_room_is_judged_against_the_share_of_free_memory() -> None:
    size = sum(t.numel() * t.element_size() for t in (state()["w"], state()["nested"][0]))  # 56 bytes
    just_enough = FakeDevice(free=int(size / 0.9) + 1)
    SnapshotBuffers(just_enough).copy(state())
    too_little = FakeDevice(free=size)  # cloning would leave nothing free
    SnapshotBuffers(too_little).copy(state())
    never = FakeDevice(free=GiB)
    SnapshotBuffers(never, clone_share=0).copy(state())
    assert just_enough.count("clone", True) == 2
    assert too_little.count("clone", True) == 0 and too_little.count("copy_async", True) == 2
    assert never.count("clone", True) == 0


def test_a_device_that_runs_out_of_memory_mid_snapshot_copies_the_rest() -> None:
    device = FakeDevice(GiB, clones_before_oom=1)
    buffers = SnapshotBuffers(device)
    snapshot = buffers.copy(state())
    assert device.count("clone", True) == 1 and device.count("copy_async", True) == 1
    out = buffers.ready(snapshot)
    assert torch.equal(out["w"], state()["w"]) and torch.equal(out["nested"][0], state()["nested"][0])


def test_a_snapshot_written_without_ready_still_holds_its_values(tmp_path: Any) -> None:
    buffers = SnapshotBuffers(FakeDevice(0))
    live = state()
    snapshot = buffers.copy(live)
    live["w"].add_(1)
    torch.save(snapshot, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))


def test_cpu_tensors_are_copied_on_the_spot_and_ready_changes_nothing() -> None:
    buffers = SnapshotBuffers()  # the CUDA copies: they own no CPU tensor
    live = state()
    snapshot = buffers.copy(live)
    live["w"].add_(1)
    assert buffers.ready(snapshot) is snapshot
    assert torch.equal(snapshot["w"], torch.arange(6.0).reshape(2, 3))
    assert not buffers.pending


def test_a_save_that_failed_before_ready_is_settled_when_the_buffers_are_recycled() -> None:
    device = FakeDevice(0)
    buffers = SnapshotBuffers(device)
    buffers.copy(state())  # the worker failed: nobody waits for these copies
    buffers.kept.recycle()
    assert device.count("wait", True) == 2 and not device.queued and not buffers.pending
    out = buffers.ready(buffers.copy(state()))
    assert len(device.pinned) == 2  # the same pinned tensors again
    assert torch.equal(out["w"], state()["w"])


def test_clone_share_outside_zero_to_one_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"use a number from 0 to 1\. Received: 1\.5"):
        SnapshotBuffers(clone_share=1.5)


def fit_async(tmp_path: Any, device: FakeDevice, epochs: int = 3) -> tuple[Checkpointer, list[torch.Tensor]]:
    """A real Checkpointer fit with async_save, its snapshots taken through `device`; the worker's writes logged."""
    parts = build()
    ckpt = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path), monitor=None, top_k=-1,
                        last=False, async_save=True)
    fw = ckpt._framework
    fw.copies = SnapshotBuffers(device)
    fw.buffers = fw.copies.kept
    real_save = torch_adapter.save_torch

    def logged_save(obj: Any, path: str, checksum: bool = True) -> None:
        device._note("write")
        real_save(obj, path, checksum)

    expected: list[torch.Tensor] = []
    original = fw.snapshot

    def snapshot(item: Any) -> Any:
        weight = fw.owner.network[0].weight
        expected.append(weight.detach().clone())
        copied = original(item)
        weight.data.add_(1000.0)  # the state changes right after the snapshot, before the worker copies
        return copied

    fw.snapshot = snapshot  # type: ignore[method-assign]
    torch_adapter.save_torch = logged_save  # type: ignore[assignment]
    try:
        train(ckpt, epochs, parts)
    finally:
        torch_adapter.save_torch = real_save
    return ckpt, expected


@pytest.mark.parametrize("free", [GiB, 0], ids=["clone-when-room", "copy-when-no-room"])
def test_through_a_fit_the_worker_waits_for_the_device_copies_before_each_write(tmp_path: Any, free: int) -> None:
    device = FakeDevice(free)
    _, expected = fit_async(tmp_path, device)
    writes = [i for i, (name, _) in enumerate(device.log) if name == "write"]
    assert len(writes) == 3 and all(not main for name, main in device.log if name in ("write", "wait"))
    tensors = device.count("clone" if free else "copy_async", True)
    assert tensors > 0 and tensors % 3 == 0  # the same tensors, each save
    start = 0
    for write in writes:  # every copy queued for a save was waited for before its file was written
        queued = [n for n, _ in device.log[start:write] if n == ("clone" if free else "copy_async")]
        waits = [n for n, _ in device.log[start:write] if n == "wait"]
        assert len(waits) == len(queued) == tensors // 3
        start = write
    assert device.count("copy_async", False) == (tensors if free else 0)  # the clones go to host in the worker
    weight = torch.load(_last_file(tmp_path), weights_only=True)["model"]["0.weight"]
    assert torch.equal(weight, expected[-1])  # the copy landed before the write, without the later change


def _last_file(folder: Any) -> str:
    files = sorted(folder.rglob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    return str(files[-1])


def test_pinned_buffers_are_kept_from_save_to_save_and_everything_goes_at_the_end(tmp_path: Any) -> None:
    device = FakeDevice(GiB)
    ckpt, _ = fit_async(tmp_path, device, epochs=3)
    per_save = device.count("clone", True) // 3
    assert len(device.pinned) == per_save  # three saves, one set of pinned tensors
    assert not ckpt._framework.copies.pending
    gc.collect()
    assert all(ref() is None for ref in device.clones)  # the device clones are gone ...
    assert all(ref() is None for ref in device.pinned)  # ... and so are the pinned tensors


class FakeCudaRandom:
    """Two CUDA devices' generator states, as torch.cuda reports them."""

    def __init__(self) -> None:
        self.states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
        self.restored: list[list[torch.Tensor]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.restored.append(list(states)))


def test_cuda_random_states_are_saved_with_the_training_state_and_restored_on_resume(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = FakeCudaRandom()
    cuda.install(monkeypatch)
    parts = build()
    ckpt = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path), monitor="val_loss")
    train(ckpt, 2, parts)
    payload = torch.load(ckpt.last_model_path, weights_only=True)["checkpoint_hooks"]
    assert len(payload["rng"][0]["torch_cuda"]) == 2
    saved = [s.clone() for s in cuda.states]
    cuda.states = [torch.zeros(16, dtype=torch.uint8)] * 2  # the new process's generators differ
    parts = build()
    resumed = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path), monitor="val_loss")
    assert train(resumed, 3, parts) == [2]
    assert len(cuda.restored) == 1
    assert all(torch.equal(a, b) for a, b in zip(cuda.restored[0], saved, strict=True))
