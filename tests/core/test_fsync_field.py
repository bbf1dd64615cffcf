"""`fsync: false`: no flush reaches the disk, and what is committed is still whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import CheckpointDirectory, Engine
from checkpoint_hooks.core.durable import DurableFile


def write(item: Any, path: str) -> None:
    with DurableFile(path) as f:  # the way torch.save writes through save_torch
        f.write(os.urandom(3 * 1024 * 1024))


def write_plain(item: Any, path: str) -> None:
    Path(path).write_bytes(os.urandom(70 * 1024 * 1024))  # large enough for the hash-time fsync thread


@pytest.mark.parametrize("fsync", [True, False])
@pytest.mark.parametrize("background", [False, True])
def test_fsync_false_flushes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool, background: bool) -> None:
    flushes: list[int] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        flushes.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    monkeypatch.setattr(os, "fdatasync", counting)
    engine = Engine(
        CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", top_k=2, fsync=fsync),
        extensions={"training_state": ".ckpt"},
    )
    engine.start()
    for epoch, loss in enumerate([0.5, 0.4, 0.3]):
        plan = engine.plan(epoch, epoch, {"val_loss": loss})
        engine.execute(plan, write if epoch else write_plain, background=background)
    engine.close()
    assert bool(flushes) == fsync
    directory = CheckpointDirectory(str(tmp_path))
    manifest = directory.read_manifest()
    assert manifest is not None and sorted(r.epoch for r in manifest.records) == [1, 2]  # the two best, one also last
    assert all(not directory.verify_record(r) for r in manifest.records)
