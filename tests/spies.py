"""Shared by the framework suites: a spy on the real local store, and a check that a directory verifies."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Collection
from typing import Any

import pytest

from checkpoint_hooks.core import CheckpointDirectory
from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.store import LocalStore


class Publishes:
    """Wraps LocalStore.publish: records the thread and the files of every call; can fail or delay some."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail_on = fail_on
        self.delay = delay
        real = LocalStore.publish

        def publish(store: LocalStore, staging_dir: str, relpaths: list[str], synced: Collection[str] = ()) -> None:
            self.calls.append((threading.current_thread().name, list(relpaths)))
            time.sleep(self.delay)
            if self.fail_on is not None and any(rel.startswith(self.fail_on) for rel in relpaths):
                raise OSError(errno.ENOSPC, "No space left on device")
            real(store, staging_dir, relpaths, synced)

        monkeypatch.setattr(LocalStore, "publish", publish)

    def in_worker(self) -> list[bool]:
        """For each call, whether the background save's worker made it."""
        return [thread.startswith("checkpoint_hooks-save") for thread, _files in self.calls]

    @property
    def threads(self) -> set[str]:
        """"main" or "worker" for each call's thread."""
        return {"main" if t == "MainThread" else "worker" if t.startswith("checkpoint_hooks-save") else t for t, _ in self.calls}


class TakenArrays:
    """Records every array HostBuffers.take hands out, kept alive here so a new one cannot take an old one's id."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.arrays: list[Any] = []
        real = HostBuffers.take

        def take(buffers: HostBuffers[Any], *args: Any) -> Any:
            array = real(buffers, *args)
            self.arrays.append(array)
            return array

        monkeypatch.setattr(HostBuffers, "take", take)

    def by_save(self, saves: int) -> list[set[int]]:
        """The ids of each save's arrays, in order (every save takes as many)."""
        per_save = len(self.arrays) // saves
        assert per_save > 0 and len(self.arrays) == saves * per_save
        return [{id(a) for a in self.arrays[i * per_save : (i + 1) * per_save]} for i in range(saves)]


def verifies(directory: str | os.PathLike[str]) -> None:
    """Every committed file of the directory is there with its size and checksum."""
    index = CheckpointDirectory(os.fspath(directory))
    manifest = index.read_manifest()
    assert manifest is not None
    for record in manifest.records:
        assert index.verify_record(record) == [], record.name
