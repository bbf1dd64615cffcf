"""An index kept beside the directory: the directory holds checkpoint files only, and every reader finds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine
from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.layout import beside_path

EXT = {"training_state": ".ckpt", "weights": ".pt", "model": ".model"}


def write_bytes(item, path):
    with open(path, "wb") as f:
        f.write(f"{item.name}:{item.format}".encode() * 10)


def engine(dirpath, beside=True, **kw):
    kw.setdefault("monitor", "val_loss")
    return Engine(CheckpointPolicy(dirpath=str(dirpath), **kw), extensions=EXT, index_beside=beside)


def test_the_directory_holds_checkpoint_files_only(tmp_path):
    ckpt = tmp_path / "ckpt"
    e = engine(ckpt, top_k=2, last=False)
    e.start()
    assert os.path.exists(beside_path(str(ckpt)) + "/.checkpoint_hooks.lock")  # the lock lies beside too
    for epoch, loss in enumerate([0.5, 0.4, 0.3]):
        e.save(epoch, epoch, {"val_loss": loss}, write_bytes)
    e.close()
    assert sorted(os.listdir(ckpt)) == ["epoch=001-val_loss=0.4000.ckpt", "epoch=002-val_loss=0.3000.ckpt"]
    index = tmp_path / ".ckpt.checkpoint_hooks"
    assert sorted(os.listdir(index)) == [
        ".checkpoint_hooks.lock",  # left empty: free
        "epoch=001-val_loss=0.4000.meta.json", "epoch=002-val_loss=0.3000.meta.json", "manifest.head", "manifest.json",
    ]
    # read without being told where the index is: the CLI's way, and a later fit's
    directory = CheckpointDirectory(str(ckpt))
    assert directory.index_apart and directory.verify() == []
    assert [r.epoch for r in directory.read_manifest().records] == [1, 2]
    resumed = engine(ckpt, beside=False, top_k=2, last=False)
    assert resumed.start().epoch == 2
    resumed.close()


def test_a_directory_with_its_index_inside_keeps_it_there(tmp_path):
    e = engine(tmp_path / "ckpt", beside=False, top_k=-1)
    e.start()
    e.save(0, 0, {"val_loss": 0.5}, write_bytes)
    e.close()
    again = engine(tmp_path / "ckpt", beside=True, top_k=-1)
    again.start()
    again.save(1, 1, {"val_loss": 0.4}, write_bytes)
    again.close()
    assert not os.path.exists(tmp_path / ".ckpt.checkpoint_hooks")
    assert len(json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["records"]) == 2


class Killed(BaseException):
    """The process ending at this point: nothing after it runs, no cleanup either."""


@pytest.mark.parametrize("crash", ["after the sidecar", "after the payload"])
def test_an_interrupted_save_is_cleaned_up_at_the_next_start(tmp_path, monkeypatch, crash):
    ckpt = tmp_path / "ckpt"
    e = engine(ckpt, top_k=-1, last=False)
    e.start()
    e.save(0, 0, {"val_loss": 0.5}, write_bytes)
    store_type, directory_type = type(e.store), type(e.directory)

    def killed(*args, **kwargs):
        raise Killed

    if crash == "after the sidecar":
        monkeypatch.setattr(store_type, "publish", killed)
    else:
        monkeypatch.setattr(directory_type, "commit_change", killed)
    monkeypatch.setattr(store_type, "remove", killed)  # a killed process takes nothing back
    with pytest.raises(Killed):
        e.save(1, 1, {"val_loss": 0.4}, write_bytes)
    monkeypatch.undo()
    e._lock.release()
    index = tmp_path / ".ckpt.checkpoint_hooks"
    assert (index / "epoch=001-val_loss=0.4000.meta.json").exists()  # described, never committed
    assert (ckpt / "epoch=001-val_loss=0.4000.ckpt").exists() == (crash == "after the payload")
    again = engine(ckpt, top_k=-1, last=False)
    assert again.start().epoch == 0
    again.close()
    assert os.listdir(ckpt) == ["epoch=000-val_loss=0.5000.ckpt"]
    assert not (index / "epoch=001-val_loss=0.4000.meta.json").exists()


def test_cli_lists_verifies_and_repairs_a_directory_with_its_index_beside(tmp_path):
    ckpt = tmp_path / "ckpt"
    e = engine(ckpt, top_k=-1, last=False)
    e.start()
    for epoch in range(2):
        e.save(epoch, epoch, {"val_loss": 0.5 - epoch / 10}, write_bytes)
    e.close()
    cli = [sys.executable, "-m", "checkpoint_hooks.cli"]
    listed = subprocess.run([*cli, "ls", str(ckpt)], capture_output=True, text=True)
    assert listed.returncode == 0 and "epoch=001-val_loss=0.4000.ckpt" in listed.stdout, listed.stderr
    index = tmp_path / ".ckpt.checkpoint_hooks"
    os.remove(index / "manifest.json")
    os.remove(index / "manifest.head")
    repaired = subprocess.run([*cli, "verify", "--repair", str(ckpt)], capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"rebuilt {index / 'manifest.json'} with 2 checkpoint(s)" in repaired.stdout
    assert sorted(os.listdir(ckpt)) == ["epoch=000-val_loss=0.5000.ckpt", "epoch=001-val_loss=0.4000.ckpt"]
