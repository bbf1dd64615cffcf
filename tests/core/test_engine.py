"""The engine against an in-memory store (exact calls) and against real temp directories."""

from __future__ import annotations

import json
import os
import sys

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine, ManifestError, MonitorError, SaveError
from checkpoint_hooks.core.records import BEST, LAST, SNAPSHOT
from tests.fakes import FakeStore

EXT = {"training_state": ".ckpt", "weights": ".pt", "model": ".model"}


def write_bytes(item, path):
    with open(path, "wb") as f:
        f.write(f"{item.name}:{item.format}".encode() * 10)


def engine(store=None, **kw):
    kw.setdefault("monitor", "val_loss")
    dirpath = kw.pop("dirpath", "unused")
    return Engine(CheckpointPolicy(dirpath=dirpath, **kw), extensions=EXT, store=store)


def test_commit_happens_before_prune_and_sidecar_before_payload():
    store = FakeStore()
    e = engine(store, top_k=1, last=False)
    assert e.start() is None
    store.calls.clear()
    e.save(0, 10, {"val_loss": 0.5}, write_bytes)
    assert store.calls == [
        ("put", "epoch=000-val_loss=0.5000.meta.json"),
        ("put", "epoch=000-val_loss=0.5000.ckpt"),
        ("write", "manifest.json"),
    ]
    store.calls.clear()
    e.save(1, 20, {"val_loss": 0.4}, write_bytes)
    assert store.calls == [
        ("put", "epoch=001-val_loss=0.4000.meta.json"),
        ("put", "epoch=001-val_loss=0.4000.ckpt"),
        ("write", "manifest.json"),
        ("remove", "epoch=000-val_loss=0.5000.ckpt"),
        ("remove", "epoch=000-val_loss=0.5000.meta.json"),
    ]
    store.calls.clear()
    e.save(2, 30, {"val_loss": 0.9}, write_bytes)  # not better: nothing written at all
    assert store.calls == []


def test_weights_format_writes_a_separate_training_state_for_last():
    store = FakeStore()
    e = engine(store, top_k=1, format="weights")
    e.start()
    records = e.save(0, 5, {"val_loss": 1.0}, write_bytes)
    assert [(r.name, r.format, sorted(r.roles)) for r in records] == [
        ("epoch=000-val_loss=1.0000", "weights", [BEST]),
        ("last-epoch=000-step=5", "training_state", [LAST]),
    ]
    # both are committed by one manifest write
    # fit start wrote the empty manifest; the save commits both records with one more write
    assert store.calls.count(("write", "manifest.json")) == 2
    e.save(1, 10, {"val_loss": 2.0}, write_bytes)
    names = sorted(r.name for r in e.manifest.records)
    assert names == ["epoch=000-val_loss=1.0000", "last-epoch=001-step=10"]


def test_manifest_records_what_the_issue_lists():
    store = FakeStore()
    e = engine(store, top_k=2, snapshots={"every_n_epochs": 1})
    e.start()
    e.save(0, 7, {"val_loss": float("nan"), "acc": 0.5, "note": "text"}, write_bytes)
    data = json.loads(store.files["manifest.json"])
    (record,) = data["records"]
    assert record["epoch"] == 0 and record["step"] == 7
    assert record["metrics"] == {"val_loss": "NaN", "acc": 0.5}
    assert record["tags"] == ["best", "last", "snapshot"]
    assert record["format"] == "training_state"
    assert record["files"][0]["path"] == "epoch=000-val_loss=nan.ckpt"
    assert record["files"][0]["checksum"].startswith("xxh3_128:")
    assert record["bytes"] == record["files"][0]["bytes"] > 0
    assert record["created"] > 0
    assert data["policy"]["top_k"] == 2


def test_writer_failing_halfway_commits_nothing(tmp_path):
    e = engine(dirpath=str(tmp_path), top_k=2)
    e.start()
    e.save(0, 1, {"val_loss": 1.0}, write_bytes)
    before = sorted(os.listdir(tmp_path))
    manifest_before = (tmp_path / "manifest.json").read_bytes()

    def half(item, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(SaveError, match=r"No space left on device.*nothing of it was committed"):
        e.save(1, 2, {"val_loss": 0.5}, half)
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "manifest.json").read_bytes() == manifest_before
    assert e.directory.verify() == []
    e.close()


def test_on_save_error_warn_keeps_training(tmp_path, caplog):
    e = engine(dirpath=str(tmp_path), on_save_error="warn")
    e.start()

    def broken(item, path):
        raise PermissionError(13, "Permission denied")

    assert e.save(0, 1, {"val_loss": 1.0}, broken) == []
    assert "Permission denied" in caplog.text and "training goes on" in caplog.text
    e.close()


def test_publish_failing_midway_leaves_no_committed_record():
    store = FakeStore()
    e = engine(store, format="weights")
    e.start()
    store.fail_publish_after = 2  # the first item's sidecar and payload land, the second item fails
    with pytest.raises(SaveError):
        e.save(0, 1, {"val_loss": 1.0}, write_bytes)
    assert e.manifest.records == []
    # the next start cleans what was published without a commit
    e.close()
    store.fail_publish_after = None
    e2 = engine(store, format="weights")
    e2.start()
    assert store.list_files() == [".checkpoint_hooks.lock", "manifest.json"]


def test_resume_picks_newest_verified_and_skips_corrupt(tmp_path, caplog):
    e = engine(dirpath=str(tmp_path), top_k=3)
    e.start()
    for epoch, loss in enumerate([0.5, 0.4, 0.3]):
        e.save(epoch, epoch, {"val_loss": loss}, write_bytes)
    newest = e.last_record
    e.close()
    with open(tmp_path / newest.primary_path, "r+b") as f:
        f.write(b"X")
    e2 = engine(dirpath=str(tmp_path), top_k=3)
    resumed = e2.start()
    assert resumed.epoch == 1
    assert f"skipping checkpoint {tmp_path / newest.primary_path}" in caplog.text
    # the corrupt newer record left the manifest, retention continues from epoch 1's state
    assert [r.epoch for r in e2.run_records()] == [0, 1]
    assert LAST in e2.run_records()[-1].tags
    e2.close()


def test_resume_never_starts_a_new_run_and_leaves_old_records(tmp_path):
    e = engine(dirpath=str(tmp_path), top_k=1)
    e.start()
    e.save(0, 0, {"val_loss": 0.1}, write_bytes)
    e.close()
    e2 = engine(dirpath=str(tmp_path), top_k=1, resume="never")
    assert e2.start() is None
    e2.save(0, 0, {"val_loss": 0.9}, write_bytes)
    e2.save(1, 1, {"val_loss": 0.8}, write_bytes)
    names = sorted(r.name for r in e2.manifest.records)
    # the earlier run's checkpoint is untouched; the new run's name got a version suffix
    assert names == ["epoch=000-val_loss=0.1000", "epoch=001-val_loss=0.8000"]
    e2.close()


def test_retention_state_survives_resume(tmp_path):
    values = [0.5, 0.2, 0.4, 0.3, 0.1, 0.6]
    full = engine(dirpath=str(tmp_path / "a"), top_k=2)
    full.start()
    for epoch, v in enumerate(values):
        full.save(epoch, epoch, {"val_loss": v}, write_bytes)
    split = engine(dirpath=str(tmp_path / "b"), top_k=2)
    split.start()
    for epoch, v in enumerate(values[:3]):
        split.save(epoch, epoch, {"val_loss": v}, write_bytes)
    split.close()
    resumed = engine(dirpath=str(tmp_path / "b"), top_k=2)
    assert resumed.start().epoch == 2
    for epoch, v in enumerate(values[3:], start=3):
        resumed.save(epoch, epoch, {"val_loss": v}, write_bytes)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    assert [(r.name, r.tags) for r in full.run_records()] == [(r.name, r.tags) for r in resumed.run_records()]


def test_missing_monitor_skips_top_k_but_keeps_last():
    store = FakeStore()
    e = engine(store, top_k=1, snapshots={"every_n_epochs": 1})
    e.start()
    records = e.save(0, 0, {"loss": 1.0}, write_bytes)
    assert records[0].roles == frozenset({LAST, SNAPSHOT})
    with pytest.raises(MonitorError, match=r"monitor='val_loss' is not among the logged metrics \(loss\)"):
        e.require_monitor({"loss": 1.0})


def test_corrupt_manifest_is_refused_not_replaced(tmp_path):
    e = engine(dirpath=str(tmp_path))
    e.start()
    e.save(0, 0, {"val_loss": 1.0}, write_bytes)
    e.close()
    (tmp_path / "manifest.json").write_text('{"format": "checkpoint_hooks.manifest", "records": [{"name"')
    with pytest.raises(ManifestError, match="is corrupt.*verify --repair"):
        engine(dirpath=str(tmp_path)).start()
    assert (tmp_path / "manifest.json").read_text().endswith('"name"')


def test_missing_manifest_with_checkpoints_is_refused_and_repairable(tmp_path):
    e = engine(dirpath=str(tmp_path), top_k=2)
    e.start()
    e.save(0, 0, {"val_loss": 1.0}, write_bytes)
    e.save(1, 1, {"val_loss": 0.5}, write_bytes)
    e.close()
    original = {r.name: r for r in e.manifest.records}
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="is missing but 2 checkpoint"):
        engine(dirpath=str(tmp_path)).start()
    rebuilt, skipped = e.directory.rebuild()
    assert skipped == []
    assert {r.name: (r.epoch, r.step, dict(r.metrics), r.files) for r in rebuilt.records} == {
        n: (r.epoch, r.step, dict(r.metrics), r.files) for n, r in original.items()
    }


def test_unknown_format_is_refused():
    with pytest.raises(SaveError, match="format='model' is not available here; use one of training_state, weights"):
        Engine(CheckpointPolicy(format="model"), extensions={"training_state": ".ckpt", "weights": ".pt"}, store=FakeStore())


def test_dirpath_that_is_a_file(tmp_path):
    from checkpoint_hooks import PolicyError

    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(PolicyError, match="is a file, not a directory"):
        Engine(CheckpointPolicy(dirpath=str(target)), extensions=EXT)


def test_state_dict_and_explicit_resume_of_an_older_record_forks(tmp_path, caplog):
    e = engine(dirpath=str(tmp_path), top_k=-1)
    e.start()
    for epoch in range(3):
        e.save(epoch, epoch, {"val_loss": 1.0 - epoch / 10}, write_bytes)
    state = e.state_dict()
    assert state["best_model_score"] == pytest.approx(0.8)
    assert state["best_model_path"].endswith("epoch=002-val_loss=0.8000.ckpt")
    assert len(state["best_k_models"]) == 3
    e.close()
    e2 = engine(dirpath=str(tmp_path), top_k=-1, resume="never")
    e2.start()
    first = e2.manifest.records[0]
    e2.load_state_dict({"record": first.name})
    assert e2.run != first.run and "stay untouched" in caplog.text
    assert len(e2.manifest.records) == 3


def test_non_writer_rank_writes_nothing(tmp_path):
    calls = []
    e = Engine(CheckpointPolicy(dirpath=str(tmp_path / "x")), extensions=EXT, is_writer=False)
    assert e.start() is None
    e.execute(e.plan(0, 0, {}), lambda item, path: calls.append(item.name))
    assert calls == ["epoch=000-step=0"]
    assert not (tmp_path / "x").exists()


def test_step_time_and_preemption_saves_become_the_resume_point(tmp_path, monkeypatch):
    e = engine(dirpath=str(tmp_path), top_k=1, every_n_steps=4, every_n_minutes=0.5)
    e.start()
    assert [s for s in range(13) if e.step_due(s)] == [4, 8, 12]
    e.execute(e.plan_training_state(0, 4, {"loss": 1.0}, mid_epoch=True), write_bytes)
    assert not e.step_due(4)  # already saved at this step
    (record,) = e.run_records()
    assert (record.name, record.mid_epoch, record.tags) == ("last-epoch=000-step=4", True, frozenset({LAST}))
    e.save(0, 6, {"val_loss": 0.5}, write_bytes)  # the epoch end supersedes it as last
    assert [(r.epoch, r.mid_epoch, sorted(r.tags)) for r in e.run_records()] == [(0, False, [BEST, LAST])]
    e.execute(e.plan_training_state(1, 9, {}, mid_epoch=True, preempted=True), write_bytes)
    assert e.last_record.name == "preempted-epoch=001-step=9" and e.last_record.tags == {LAST, "preempted"}
    e.close()
    again = engine(dirpath=str(tmp_path), top_k=1)
    resumed = again.start()
    assert (resumed.name, resumed.mid_epoch, resumed.step) == ("preempted-epoch=001-step=9", True, 9)
    again.close()
    # the time trigger counts from the start and from every save
    clock = [1000.0]
    monkeypatch.setattr("checkpoint_hooks.core.engine.time.monotonic", lambda: clock[0])
    timed = engine(dirpath=str(tmp_path / "t"), every_n_minutes=0.5)
    timed.start()
    assert not timed.time_due()
    clock[0] += 31
    assert timed.time_due()
    timed.execute(timed.plan_training_state(0, 1, {}, mid_epoch=True), write_bytes)
    assert not timed.time_due()
    timed.close()


def test_a_non_writer_follows_the_writers_resume_point_without_locking(tmp_path):
    e = engine(dirpath=str(tmp_path), top_k=1)
    e.start()
    e.save(0, 1, {"val_loss": 1.0}, write_bytes)
    e.save(1, 2, {"val_loss": 2.0}, write_bytes)
    writer_again = engine(dirpath=str(tmp_path), top_k=1)  # holds the lock from here on
    resumed = writer_again.start()
    reader = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss"), extensions=EXT, is_writer=False)
    followed = reader.start()
    assert followed is not None and followed.name == resumed.name == "epoch=001-val_loss=2.0000"
    assert reader.execute(reader.plan(2, 3, {"val_loss": 0.1}), write_bytes) == []  # writes nothing
    writer_again.close()
    e.close()


def test_async_save_snapshots_now_writes_later_and_surfaces_errors(tmp_path, caplog):
    import threading

    e = engine(dirpath=str(tmp_path), top_k=2, async_save=True)
    e.start()
    state = {"value": b"first"}
    release = threading.Event()
    started = threading.Event()

    def snapshot(item):
        return bytes(state["value"])  # the copy the training loop pays for

    def write(item, payload, path):
        started.set()
        release.wait(10)
        with open(path, "wb") as f:
            f.write(payload)

    e.execute_async(e.plan(0, 1, {"val_loss": 0.5}), snapshot, write)
    state["value"] = b"changed after the snapshot"
    assert started.wait(10)
    assert e.manifest.records == [] and not any(n.endswith(".ckpt") for n in os.listdir(tmp_path))  # nothing visible yet
    threading.Timer(0.2, release.set).start()
    plan = e.plan(1, 2, {"val_loss": 0.4})  # waits for the save in flight, then decides on it
    (first,) = e.manifest.records
    assert (tmp_path / first.primary_path).read_bytes() == b"first"
    assert [i.name for i in plan.items] == ["epoch=001-val_loss=0.4000"]

    def broken(item, payload, path):
        raise OSError(28, "No space left on device")

    e.execute_async(plan, snapshot, broken)
    with pytest.raises(SaveError, match="No space left on device"):
        e.plan(2, 3, {"val_loss": 0.3})
    assert [r.epoch for r in e.manifest.records] == [0]  # nothing of the failed save was committed
    e.execute_async(e.plan(2, 3, {"val_loss": 0.3}), snapshot, lambda item, payload, path: open(path, "wb").write(payload))
    e.close()  # flushes
    assert [r.epoch for r in e.manifest.records] == [0, 2]
    assert e.directory.verify() == []


def test_background_buffers_are_recycled_once_the_save_in_flight_is_over_and_let_go_at_close(tmp_path):
    import time

    from checkpoint_hooks.core.buffers import HostBuffers

    events = []

    class Watched(HostBuffers):
        def recycle(self):
            events.append("recycle")
            super().recycle()

        def clear(self):
            events.append("clear")
            super().clear()

    buffers = Watched(lambda shape, dtype: bytearray(shape[0]))

    def snapshot(item):
        events.append("snapshot")
        array = buffers.take((4,), "u1")
        array[:] = item.name.encode()[:4]
        return array

    def write(item, array, path):
        time.sleep(0.1)  # still in flight when the next plan comes
        with open(path, "wb") as f:
            f.write(bytes(array))
        events.append("written")

    e = engine(dirpath=str(tmp_path), top_k=-1)
    e.start()
    first, second = e.plan(0, 1, {"val_loss": 0.5}), e.plan(1, 2, {"val_loss": 0.4})  # plan() itself waits
    e.execute_async(first, snapshot, write, buffers)
    e.execute_async(second, snapshot, write, buffers)
    e.close()
    assert events == ["recycle", "snapshot", "written", "recycle", "snapshot", "written", "clear"]
    assert buffers._free == {} and buffers._used == []


def test_background_execute_writes_now_and_commits_in_the_worker(tmp_path, monkeypatch, caplog):
    import threading

    from checkpoint_hooks.core import transaction as transaction_module

    e = engine(dirpath=str(tmp_path), top_k=1)
    e.start()
    writer_threads = []
    gate = threading.Event()
    real_checksum = transaction_module.checksum_file

    def held_checksum(path):
        gate.wait(10)  # hold the worker before its commit
        return real_checksum(path)

    monkeypatch.setattr(transaction_module, "checksum_file", held_checksum)

    def write(item, path):
        writer_threads.append(threading.current_thread())
        with open(path, "wb") as f:
            f.write(item.name.encode())
        with open(path + ".extra", "wb") as f:  # a sibling file travels with it
            f.write(b"x")

    assert e.execute(e.plan(0, 1, {"val_loss": 0.5}), write, background=True) == []
    assert writer_threads == [threading.current_thread()]  # the state was written on the calling thread
    assert e._inflight is not None and not e._inflight.done()
    assert not any(n.endswith(".ckpt") for n in os.listdir(tmp_path))  # nothing visible before the commit
    gate.set()
    plan = e.plan(1, 2, {"val_loss": 0.4})  # waits for the save in flight
    (first,) = e.manifest.records
    assert [f.path for f in first.files] == [first.primary_path, first.primary_path + ".extra"]
    assert (tmp_path / first.primary_path).read_bytes() == first.name.encode()
    assert e.directory.verify() == []

    def broken(item, path):
        raise OSError(28, "No space left on device")

    with pytest.raises(SaveError, match="No space left on device"):  # a failed write raises at once
        e.execute(plan, broken, background=True)
    monkeypatch.setattr(e.store, "publish", lambda *a, **k: (_ for _ in ()).throw(OSError(5, "I/O error")))
    e.execute(e.plan(1, 2, {"val_loss": 0.4}), write, background=True)
    with pytest.raises(SaveError, match="I/O error"):  # a failure in the worker surfaces at the end
        e.close()
    assert [r.epoch for r in e.manifest.records] == [0]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".staging-")]  # the staged files are gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads have a nice value of their own on Linux")
def test_the_background_worker_runs_at_the_lowest_cpu_priority(tmp_path):
    import threading

    e = engine(dirpath=str(tmp_path), top_k=1)
    e.start()
    seen = []

    def write(item, state, path):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        with open(path, "wb") as f:
            f.write(state)

    e.execute_async(e.plan(0, 1, {"val_loss": 0.5}), lambda item: item.name.encode(), write)
    e.close()
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19  # the training thread keeps its own
    assert e.directory.verify() == []
