"""Fit start finds where to resume from the head, the journal and the base's checksum, without parsing the index."""

from __future__ import annotations

import logging

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine
from checkpoint_hooks.core import manifest as manifest_module
from checkpoint_hooks.core.manifest import HEAD_NAME, MANIFEST_NAME

EXT = {"training_state": ".ckpt", "weights": ".pt"}


def write(item, path):
    with open(path, "wb") as f:
        f.write(item.name.encode() * 4)


def train(tmp_path, epochs, first=0, **kw):
    kw.setdefault("snapshots", {"every_n_epochs": 1})
    engine = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", **kw), extensions=EXT)
    engine.start()
    for epoch in range(first, first + epochs):
        engine.save(epoch, epoch, {"val_loss": 1.0 / (epoch + 1)}, write)
    return engine


def resume(tmp_path, **kw):
    kw.setdefault("snapshots", {"every_n_epochs": 1})
    engine = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", **kw), extensions=EXT)
    return engine, engine.start()


@pytest.fixture
def parses(monkeypatch):
    """Counts full parses of the index."""
    calls = []
    original = manifest_module.Manifest.from_bytes.__func__

    def counting(cls, *a, **kw):
        calls.append(1)
        return original(cls, *a, **kw)

    monkeypatch.setattr(manifest_module.Manifest, "from_bytes", classmethod(counting))
    return calls


def test_resume_comes_from_the_head_and_the_journal_before_the_index_is_parsed(tmp_path, parses):
    train(tmp_path, 5).close()  # the base and its head hold epochs 0..4
    crashed = train(tmp_path, 2, first=5)  # two journal lines on top, never folded in (a crash)
    crashed._release()
    parses.clear()
    engine, record = resume(tmp_path)
    assert record.epoch == 6 and engine.run == record.run
    assert parses == []  # the full index waits until something needs it
    assert [r.epoch for r in engine.run_records()] == list(range(7))
    assert parses == [1]
    engine.save(7, 7, {"val_loss": 0.1}, write)
    engine.close()
    assert [r.epoch for r in resume(tmp_path)[0].directory.load().records] == list(range(8))


def test_a_head_that_does_not_match_its_base_is_ignored(tmp_path, parses):
    train(tmp_path, 3).close()
    base = (tmp_path / MANIFEST_NAME).read_bytes()
    (tmp_path / MANIFEST_NAME).write_bytes(base.replace(b'"next_seq":', b'"next_seq" :'))  # same content, other bytes
    parses.clear()
    engine, record = resume(tmp_path)
    assert record.epoch == 2 and parses == [1]  # read the hard way
    engine.close()


def test_every_listed_candidate_corrupt_falls_back_to_the_full_index(tmp_path, caplog):
    train(tmp_path, 6).close()
    engine, _ = resume(tmp_path)
    newest = sorted(engine.manifest.records, key=lambda r: -r.seq)[: manifest_module.HEAD_NEWEST]
    engine.close()
    for record in newest:  # the head lists exactly these
        (tmp_path / record.primary_path).write_bytes(b"X" * 3)
    caplog.set_level(logging.WARNING, "checkpoint_hooks")
    engine, record = resume(tmp_path)
    assert record.epoch == 2  # the newest one the head did not list
    assert caplog.text.count("skipping checkpoint") == manifest_module.HEAD_NEWEST
    engine.close()


def test_a_head_without_resumable_records_means_none(tmp_path, parses):
    engine = train(tmp_path, 2, format="weights", last=False)
    engine.close()
    parses.clear()
    engine, record = resume(tmp_path, format="weights", last=False)
    assert record is None
    engine.close()


def test_records_dropped_by_the_journal_are_not_candidates(tmp_path):
    train(tmp_path, 1, top_k=1, snapshots={}).close()  # the head lists epoch 0
    first = {p.name: p.read_bytes() for p in tmp_path.glob("epoch=000*")}
    crashed = train(tmp_path, 3, first=1, top_k=1, snapshots={})  # each save drops the one before
    newest = crashed.last_record
    crashed._release()
    for name, data in first.items():  # epoch 0's files are back, intact, but no longer committed
        (tmp_path / name).write_bytes(data)
    (tmp_path / newest.primary_path).write_bytes(b"X")
    engine, record = resume(tmp_path, top_k=1, snapshots={})
    assert record is None
    engine.close()


def test_the_head_is_rewritten_with_the_base(tmp_path):
    train(tmp_path, 2).close()
    assert (tmp_path / HEAD_NAME).exists()
    head = manifest_module.Head(
        (tmp_path / HEAD_NAME).read_bytes(), (tmp_path / MANIFEST_NAME).read_bytes(), None
    )
    assert [r.epoch for r in head.records] == [1, 0]
