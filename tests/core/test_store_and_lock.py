"""Stores on real temp directories and fsspec's memory filesystem; the directory lock across processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine, LockError, open_store
from checkpoint_hooks.core.lock import LOCK_NAME, DirectoryLock
from checkpoint_hooks.core.store import FsspecStore, LocalStore

EXT = {"training_state": ".ckpt"}


def writer(item, path):
    with open(path, "wb") as f:
        f.write(os.urandom(1000))


@pytest.fixture(params=["local", "memory"])
def dirpath(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt")
    return f"memory://{tmp_path.name}/ckpt"


def test_open_store_kinds(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store("memory://x/y"), FsspecStore)


def test_save_prune_resume_verify_on_each_store(dirpath):
    policy = CheckpointPolicy(dirpath=dirpath, monitor="val_loss", top_k=2)
    engine = Engine(policy, extensions=EXT)
    engine.start()
    for epoch, loss in enumerate([0.5, 0.4, 0.6, 0.3]):
        engine.save(epoch, epoch, {"val_loss": loss}, writer)
    kept = sorted(r.epoch for r in engine.manifest.records)
    assert kept == [1, 3]
    files = engine.store.list_files()
    assert sorted(f for f in files if f.endswith(".ckpt")) == [
        "epoch=001-val_loss=0.4000.ckpt",
        "epoch=003-val_loss=0.3000.ckpt",
    ]
    assert engine.directory.verify() == []
    engine.close()
    again = Engine(policy, extensions=EXT)
    resumed = again.start()
    assert resumed.epoch == 3
    path = again.local_path(resumed)
    assert os.path.getsize(path) == 1000
    again.close()


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    store = LocalStore(str(tmp_path))
    store.write_bytes("a.json", b"1")
    store.write_bytes("a.json", b"2")
    assert store.read_bytes("a.json") == b"2"
    assert os.listdir(tmp_path) == ["a.json"]


def test_appending_to_a_file_made_again_behind_the_store_fsyncs_its_folder(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path))
    folders = []
    real = os.fsync

    def spy(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            folders.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.append_bytes("journal", b"one\n")
    assert len(folders) == 1  # created: its name is made durable
    store.append_bytes("journal", b"two\n")
    assert len(folders) == 1
    os.remove(tmp_path / "journal")  # not through the store
    store.append_bytes("journal", b"three\n")
    assert len(folders) == 2
    assert (tmp_path / "journal").read_bytes() == b"three\n"
    store.remove("journal")
    store.append_bytes("journal", b"four\n")
    assert len(folders) == 3 and (tmp_path / "journal").read_bytes() == b"four\n"


def test_staging_is_removed_on_exception(tmp_path):
    store = LocalStore(str(tmp_path))
    with pytest.raises(RuntimeError):
        with store.staging() as stage:
            open(os.path.join(stage, "x"), "wb").close()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_staging_leftovers_of_a_killed_save_are_cleaned(tmp_path):
    policy = CheckpointPolicy(dirpath=str(tmp_path))
    engine = Engine(policy, extensions=EXT)
    engine.start()
    engine.save(0, 0, {}, writer)
    engine.close()
    # a kill mid-save leaves a staging folder, a published-but-uncommitted checkpoint, and the
    # killed holder's entry in the lock file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "started": 0}))
    os.mkdir(tmp_path / ".staging-dead")
    (tmp_path / ".staging-dead" / "x.ckpt").write_bytes(b"half")
    (tmp_path / "epoch=009-step=9.ckpt").write_bytes(b"orphan")
    (tmp_path / "epoch=009-step=9.meta.json").write_text(
        json.dumps({"name": "epoch=009-step=9", "epoch": 9, "step": 9, "format": "training_state",
                    "files": [{"path": "epoch=009-step=9.ckpt", "bytes": 6}]})
    )
    (tmp_path / "notes.txt").write_text("the user's own file")
    engine = Engine(policy, extensions=EXT)
    assert engine.start().epoch == 0
    engine.save(1, 1, {}, writer)  # cleaned before the first save
    assert sorted(os.listdir(tmp_path)) == [
        ".checkpoint_hooks.lock", "epoch=001-step=1.ckpt", "epoch=001-step=1.meta.json",
        "manifest.head", "manifest.journal", "manifest.json", "notes.txt",
    ]
    engine.close()


HOLD = textwrap.dedent(
    """
    import sys, time
    from checkpoint_hooks.core.lock import DirectoryLock
    from checkpoint_hooks.core.store import LocalStore
    lock = DirectoryLock(LocalStore(sys.argv[1]))
    lock.acquire()
    print("held", flush=True)
    if sys.argv[2] == "die":
        import os; os._exit(0)
    time.sleep(60)
    """
)


def test_second_process_fails_fast_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "hold"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError) as info:
            DirectoryLock(LocalStore(str(tmp_path))).acquire()
        message = str(info.value)
        assert f"pid {holder.pid} on host {os.uname().nodename}, started" in message
        assert "point this run at another dirpath" in message
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "die"], check=True, capture_output=True)
    lock = DirectoryLock(LocalStore(str(tmp_path)))
    lock.acquire()
    assert "taking over the lock" in caplog.text and "which has ended" in caplog.text
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid()
    lock.release()


def test_remote_lock_refuses_a_live_holder(tmp_path):
    store = FsspecStore(f"memory://{tmp_path.name}/locked")
    store.write_bytes(LOCK_NAME, json.dumps({"pid": 1, "host": "elsewhere", "started": 0}).encode())
    with pytest.raises(LockError, match="pid 1 on host elsewhere"):
        DirectoryLock(store).acquire()


def test_same_process_rerun_takes_over(tmp_path, caplog):
    first = DirectoryLock(LocalStore(str(tmp_path)))
    first.acquire()
    second = DirectoryLock(LocalStore(str(tmp_path)))
    second.acquire()
    assert "still locked by an earlier run in this process" in caplog.text
    assert second.held and not first.held
    second.release()


def test_after_a_clean_end_the_directory_is_not_walked(tmp_path, monkeypatch):
    policy = CheckpointPolicy(dirpath=str(tmp_path))
    engine = Engine(policy, extensions=EXT)
    engine.start()
    engine.save(0, 0, {}, writer)
    engine.close()
    walked = []
    original = LocalStore.list_files
    monkeypatch.setattr(LocalStore, "list_files", lambda self: walked.append(1) or original(self))
    again = Engine(policy, extensions=EXT)
    assert again.start().epoch == 0
    assert walked == []
    again.close()


def test_a_resume_download_is_removed_at_the_first_epoch_end(tmp_path):
    url = f"memory://{tmp_path.name}/downloads"
    first = Engine(CheckpointPolicy(dirpath=url), extensions=EXT)
    first.start()
    first.save(0, 1, {}, writer)
    first.close()
    engine = Engine(CheckpointPolicy(dirpath=url), extensions=EXT)
    record = engine.start()
    path = engine.local_path(record)  # what a framework loads
    assert os.path.exists(path)
    engine.plan(1, 2, {})
    assert not os.path.exists(os.path.dirname(path))  # not left for a crash later in the run to leak
    engine.close()
