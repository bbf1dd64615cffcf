"""Records of checkpoints that are a folder of files (a sharded state): the index, loading, retention."""

from __future__ import annotations

import os

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine
from checkpoint_hooks.core.paths import UnsafePathError
from checkpoint_hooks.core.records import FileEntry, Record

EXT = {"training_state": ".ckpt", "sharded": ".dcp"}


def folder_record(folder: str = "a.dcp", files: tuple[str, ...] = ("a.dcp/.metadata", "a.dcp/__0_0.distcp")) -> dict:
    record = Record("a", 0, 0, "sharded", files=tuple(FileEntry(p, 1) for p in files), folder=folder)
    return record.to_json()


def test_a_folder_record_round_trips_and_is_what_a_framework_loads() -> None:
    data = folder_record()
    record = Record.from_json(data)
    assert record.folder == "a.dcp" and record.primary_path == "a.dcp"
    plain = Record("b", 0, 0, "training_state", files=(FileEntry("b.ckpt", 1),))
    assert "folder" not in plain.to_json() and plain.primary_path == "b.ckpt"


@pytest.mark.parametrize(
    ("folder", "files", "error", "message"),
    [
        ("../elsewhere", ("../elsewhere/x",), UnsafePathError, "checkpoint folder"),
        ("/abs", ("a.dcp/x",), UnsafePathError, "absolute"),
        ("a.dcp", ("a.dcp/x", "b.ckpt"), ValueError, "does not hold its files"),
        ("a.dcp", (), ValueError, "does not hold its files"),
    ],
)
def test_an_index_whose_folder_does_not_hold_its_files_is_refused(
    folder: str, files: tuple[str, ...], error: type[Exception], message: str
) -> None:
    data = folder_record()
    data["folder"], data["files"] = folder, [{"path": p, "bytes": 1} for p in files if not p.startswith("..")]
    with pytest.raises(error, match=message):
        Record.from_json(data)


def write_folder(item, path):  # type: ignore[no-untyped-def]
    os.mkdir(path)
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        with open(os.path.join(path, name), "wb") as f:
            f.write(f"{item.name}/{name}".encode())


def test_a_checkpoint_written_as_a_folder_is_committed_loaded_and_pruned_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    e = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", format="sharded"), extensions=EXT, resumable_formats=frozenset(EXT))
    e.start()
    first = e.save(0, 1, {"val_loss": 0.5}, write_folder)
    assert [r.folder for r in first] == ["epoch=000-val_loss=0.5000.dcp"]
    assert len(first[0].files) == 3 and all(f.checksum for f in first[0].files)
    assert e.local_path(first[0]) == str(tmp_path / "epoch=000-val_loss=0.5000.dcp")
    assert e.problems(first[0]) == []
    e.save(1, 2, {"val_loss": 0.4}, write_folder)  # top_k=1 and last: the first checkpoint goes
    e.close()
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".dcp")) == ["epoch=001-val_loss=0.4000.dcp"]


def test_a_folder_swapped_for_a_link_is_not_loaded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    e = Engine(CheckpointPolicy(dirpath=str(tmp_path / "d"), monitor="val_loss", format="sharded"), extensions=EXT, resumable_formats=frozenset(EXT))
    e.start()
    [record] = e.save(0, 1, {"val_loss": 0.5}, write_folder)
    folder = tmp_path / "d" / record.folder
    os.rename(folder, tmp_path / "moved")
    os.symlink(tmp_path / "moved", folder)
    with pytest.raises(UnsafePathError):
        e.local_path(record)
    e.close()
