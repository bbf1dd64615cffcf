"""Full disks and read-only directories: a clear error at the moment of failure, nothing half committed."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import CheckpointError, Engine, SaveError

EXT = {"training_state": ".bin"}


def writer(size):
    def write(item, path):
        with open(path, "wb") as f:
            f.write(os.urandom(size))
    return write


def engine(dirpath, **kw):
    e = Engine(CheckpointPolicy(dirpath=str(dirpath), monitor="loss", top_k=3, **kw), extensions=EXT)
    e.start()
    return e


def full_disk_engine(small_fs, tmp_path, monkeypatch, **kw):
    """An engine on a real 1 MiB tmpfs, or on a normal folder whose writes fail with ENOSPC past 1 MiB."""
    if small_fs is not None:
        return engine(small_fs / "ckpt", **kw)
    from checkpoint_hooks.core import transaction

    original = transaction.checksum_file

    def checksum_file(path):
        if os.path.getsize(path) > 500_000:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(path)

    monkeypatch.setattr(transaction, "checksum_file", checksum_file)
    return engine(tmp_path / "ckpt", **kw)


def test_enospc_is_clear_and_commits_nothing(small_fs, tmp_path, monkeypatch):
    e = full_disk_engine(small_fs, tmp_path, monkeypatch)
    e.save(0, 1, {"loss": 1.0}, writer(300_000))
    before = sorted(e.store.list_files())
    with pytest.raises(SaveError) as info:
        e.save(1, 2, {"loss": 0.5}, writer(900_000))
    message = str(info.value)
    assert "No space left on device" in message
    assert e.directory.url in message and "epoch=001-loss=0.5000.bin" in message
    assert "the previous save took 300000 bytes" in message
    assert "nothing of it was committed and earlier checkpoints are intact" in message
    assert sorted(e.store.list_files()) == before
    assert e.directory.verify() == []
    assert [r.epoch for r in e.manifest.records] == [0]
    # the next save that fits works
    e.save(2, 3, {"loss": 0.4}, writer(200_000))
    assert [r.epoch for r in e.manifest.records] == [0, 2]
    e.close()


def test_enospc_with_on_save_error_warn_goes_on(small_fs, tmp_path, monkeypatch, caplog):
    e = full_disk_engine(small_fs, tmp_path, monkeypatch, on_save_error="warn")
    e.save(0, 1, {"loss": 1.0}, writer(300_000))
    assert e.save(1, 2, {"loss": 0.5}, writer(900_000)) == []
    assert "No space left on device" in caplog.text and "training goes on" in caplog.text
    assert e.directory.verify() == []
    e.close()


def test_read_only_directory(small_fs, tmp_path):
    if small_fs is None:
        pytest.skip("needs a mount this process can remount read-only (root)")
    directory = small_fs / "ckpt"
    e = engine(directory)
    e.save(0, 1, {"loss": 1.0}, writer(1000))
    # a read-only bind mount over the directory while the run holds its lock file open
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        with pytest.raises(SaveError, match="Read-only file system.*nothing of it was committed"):
            e.save(1, 2, {"loss": 0.5}, writer(1000))
        assert e.directory.verify() == []
        assert [r.epoch for r in e.manifest.records] == [0]
        e.close()
        with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*Read-only file system; point dirpath"):
            Engine(CheckpointPolicy(dirpath=str(directory / "sub")), extensions=EXT).start()
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
