"""The manifest journal: one appended line per commit, torn tails ignored, damage refused, compaction."""

from __future__ import annotations

import json
import os

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine, ManifestError
from checkpoint_hooks.core import directory as directory_module
from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.manifest import JOURNAL_NAME, MANIFEST_NAME

EXT = {"training_state": ".ckpt"}


def write(item, path):
    with open(path, "wb") as f:
        f.write(item.name.encode())


def run(tmp_path, values, **kw):
    e = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="loss", top_k=2, **kw), extensions=EXT)
    e.start()
    for epoch, v in enumerate(values):
        e.save(epoch, epoch, {"loss": v}, write)
    return e


def test_epoch_commits_append_to_the_journal_and_readers_see_them(tmp_path):
    e = run(tmp_path, [0.5, 0.4, 0.6, 0.3])
    base = json.loads((tmp_path / MANIFEST_NAME).read_bytes())
    assert base["records"] == []  # written once at fit start
    lines = (tmp_path / JOURNAL_NAME).read_bytes().splitlines()
    assert len(lines) == 4 and [json.loads(line.partition(b" ")[2])["commit"] for line in lines] == [2, 3, 4, 5]
    seen = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert sorted((r.epoch, sorted(r.tags)) for r in seen.records) == [(1, ["best"]), (3, ["best", "last"])]
    assert [h["epoch"] for h in seen.history] == [0, 1, 2, 3]
    assert sorted((r.name, r.tags) for r in seen.records) == sorted((r.name, r.tags) for r in e.manifest.records)
    e.close()
    # the end of the fit folds the journal into one base
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert len(json.loads((tmp_path / MANIFEST_NAME).read_bytes())["records"]) == 2


def test_a_torn_last_line_is_a_commit_that_did_not_happen(tmp_path):
    run(tmp_path, [0.5, 0.4])  # not closed: as after a crash, the journal holds the commits
    with open(tmp_path / JOURNAL_NAME, "ab") as f:
        f.write(b'0123456789abcdef {"commit":4,"add":[{"na')  # a crash in the middle of an append
    seen = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert sorted(r.epoch for r in seen.records) == [0, 1]


def test_a_damaged_complete_line_is_refused(tmp_path):
    e = run(tmp_path, [0.5, 0.4, 0.3])
    e._lock.release()  # a crash: the lock goes, the journal stays
    raw = bytearray((tmp_path / JOURNAL_NAME).read_bytes())
    raw[30] ^= 0x01  # inside the first line, which is followed by others
    (tmp_path / JOURNAL_NAME).write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=r"manifest.journal line 1 is damaged \(checksum mismatch\).*verify --repair"):
        CheckpointDirectory(str(tmp_path)).read_manifest()
    files_before = sorted(os.listdir(tmp_path))
    with pytest.raises(ManifestError):
        Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="loss", top_k=2), extensions=EXT).start()
    assert sorted(os.listdir(tmp_path)) == files_before  # nothing was cleaned away on a damaged index


def test_compaction_every_n_lines_keeps_numbering(tmp_path, monkeypatch):
    monkeypatch.setattr(directory_module, "COMPACT_EVERY", 3)
    run(tmp_path, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    base = json.loads((tmp_path / MANIFEST_NAME).read_bytes())
    journal = (tmp_path / JOURNAL_NAME).read_bytes().splitlines()
    # fit start wrote commit 1; lines 2-4, base 5, lines 6-8
    assert base["commit"] == 5 and len(journal) == 3
    seen = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert seen.commit == 8 and sorted(r.epoch for r in seen.records) == [5, 6]
    assert [h["epoch"] for h in seen.history] == list(range(7))


def test_lines_already_in_the_base_are_skipped(tmp_path):
    """A crash between rewriting the base and removing the journal leaves lines the base holds."""
    e = run(tmp_path, [0.5, 0.4, 0.3])
    journal = (tmp_path / JOURNAL_NAME).read_bytes()
    e.directory.commit(e.manifest)  # compaction: the base takes every change
    (tmp_path / JOURNAL_NAME).write_bytes(journal)  # ...and the journal survived the crash
    seen = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert sorted(r.name for r in seen.records) == sorted(r.name for r in e.manifest.records)
    assert len(seen.history) == 3
    e.close()


def test_a_reader_on_another_thread_sees_each_change_whole():
    """A background save changes the index while the training thread reads best and last from it."""
    import threading

    from checkpoint_hooks.core.manifest import Manifest
    from checkpoint_hooks.core.records import BEST, LAST, Record

    manifest = Manifest([Record(name=f"old{i}", epoch=i, step=i, format="weights", run="r", seq=i + 1) for i in range(2000)])
    stop, errors, seen = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                best, last = manifest.holders("r", BEST), manifest.holders("r", LAST)
                seen.append((len(best), len(last)))
                manifest.run_records("r")
                manifest.referenced_paths()
            except Exception as exc:  # any error is the failure
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(3000):
        new = Record(name=f"n{i}", epoch=i, step=i, format="training_state", tags=frozenset({BEST, LAST}), run="r", seq=3000 + i)
        previous = [f"n{i - 1}"] if i else []
        manifest.apply(manifest.change(add=[new], drop=previous), history=False)
    stop.set()
    reader.join()
    assert errors == []
    assert seen and all(counts in ((0, 0), (1, 1)) for counts in seen)  # never half a change
