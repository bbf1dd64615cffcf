"""A checkpoint directory written by someone else: nothing read from it may reach outside, hang, or crash.

Each case plants something in a real directory (an index record, a sidecar, a link, a
special file), then runs what a user runs on it: a resumed training run, or the
`checkpoint-hooks` command as a subprocess with a time limit. Every case checks that a
victim file outside the directory is byte-identical afterwards, and that the error a
user sees is one line without a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import CheckpointDirectory, Engine, LocalStore
from checkpoint_hooks.core.errors import CheckpointError, ManifestError
from checkpoint_hooks.core.lock import LOCK_NAME
from checkpoint_hooks.core.manifest import HEAD_NAME, JOURNAL_NAME, MANIFEST_NAME
from tests.core.test_session import fit, session

TIME_LIMIT = 30  # seconds a command may take on a hostile directory before it counts as hanging
VICTIM_BYTES = b"precious bytes that must survive\n"
EXT = {"training_state": ".ckpt"}


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_BYTES)
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A real directory of three checkpoints (epochs 0-2, all kept), beside the victim."""
    path = tmp_path / "ckpt"
    engine = Engine(CheckpointPolicy(dirpath=str(path), monitor="val_loss", top_k=-1), extensions=EXT)
    engine.start()
    for epoch, loss in enumerate([0.5, 0.4, 0.3]):
        engine.save(epoch, epoch * 10, {"val_loss": loss}, lambda item, p: Path(p).write_bytes(os.urandom(64)))
    engine.close()
    return path


def rewrite_index(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the index as one plain manifest.json (no journal, no head) after `change` edits its JSON."""
    manifest = CheckpointDirectory(str(directory)).read_manifest()
    assert manifest is not None
    data = json.loads(manifest.to_bytes())
    change(data)
    (directory / MANIFEST_NAME).write_text(json.dumps(data))
    for name in (JOURNAL_NAME, HEAD_NAME):
        (directory / name).unlink(missing_ok=True)


def set_first_path(path: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["records"][0]["files"][0]["path"] = path

    return change


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "checkpoint_hooks.cli", *args], capture_output=True, text=True, timeout=TIME_LIMIT
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_intact(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM_BYTES


def prune_policy(tmp_path: Path, top_k: int = 1) -> str:
    path = tmp_path / "prune.yaml"
    path.write_text(f"monitor: val_loss\ntop_k: {top_k}\nlast: false\n")
    return str(path)


# -- 1. paths in the index that leave the directory ------------------------------------------


@pytest.mark.parametrize("planted", ["../victim.txt", "..", "/etc/hostname", "a/../../victim.txt", "./x", "a//b"])
def test_index_paths_outside_the_directory_are_refused_by_prune(tmp_path, ckpt, victim, planted):
    policy = prune_policy(tmp_path)
    siblings = sorted(os.listdir(tmp_path))
    rewrite_index(ckpt, set_first_path(planted))
    proc = cli("prune", str(ckpt), "--policy", policy)
    assert_one_line_error(proc, 3, "refusing", "nothing was read or deleted")
    assert_intact(victim)
    assert sorted(os.listdir(tmp_path)) == siblings
    assert len(os.listdir(ckpt)) >= 6  # three checkpoints and their sidecars, untouched


def test_a_record_name_that_leaves_the_directory_is_refused(tmp_path, ckpt, victim):
    def change(data: dict[str, Any]) -> None:
        data["records"][0]["name"] = "../victim"  # its sidecar would be ../victim.meta.json

    (tmp_path / "victim.meta.json").write_bytes(VICTIM_BYTES)
    rewrite_index(ckpt, change)
    assert_one_line_error(cli("prune", str(ckpt), "--policy", prune_policy(tmp_path)), 3, "'../victim'")
    assert (tmp_path / "victim.meta.json").read_bytes() == VICTIM_BYTES


def test_a_resumed_run_refuses_an_index_that_leaves_the_directory(tmp_path, ckpt, victim):
    rewrite_index(ckpt, set_first_path("../victim.txt"))
    engine = Engine(CheckpointPolicy(dirpath=str(ckpt), monitor="val_loss", top_k=1), extensions=EXT)
    with pytest.raises(ManifestError) as caught:
        engine.start()
    assert "\n" not in str(caught.value) and "'../victim.txt'" in str(caught.value)
    assert_intact(victim)


def test_a_journal_line_with_an_outside_path_is_refused(tmp_path, ckpt, victim):
    from checkpoint_hooks.core.manifest import journal_line

    manifest = CheckpointDirectory(str(ckpt)).read_manifest()
    assert manifest is not None
    record = manifest.records[0].to_json()
    record["name"], record["files"][0]["path"] = "evil", "../victim.txt"
    change = {"commit": manifest.commit + 1, "add": [record], "drop": [], "tags": {}, "next_seq": 99, "history": []}
    with open(ckpt / JOURNAL_NAME, "ab") as f:
        f.write(journal_line(change))
    assert_one_line_error(cli("ls", str(ckpt)), 3, "'../victim.txt'")
    assert_one_line_error(cli("prune", str(ckpt), "--policy", prune_policy(tmp_path)), 3, "'../victim.txt'")
    assert_intact(victim)


def test_planted_sidecars_never_delete_outside(tmp_path, ckpt, victim):
    (ckpt / "evil.meta.json").write_text(json.dumps({
        "name": "evil", "epoch": 9, "step": 9, "format": "training_state",
        "files": [{"path": "../victim.txt", "bytes": len(VICTIM_BYTES), "checksum": None}],
    }))
    (ckpt / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone"}))  # an unclean end: cleanup runs
    engine = Engine(CheckpointPolicy(dirpath=str(ckpt), monitor="val_loss", top_k=-1), extensions=EXT)
    engine.start()
    engine.close()
    assert_intact(victim)
    assert not (ckpt / "evil.meta.json").exists()  # our leftover suffix inside the directory: removed

    (ckpt / "evil2.meta.json").write_text(json.dumps({
        "name": "evil2", "epoch": 9, "step": 9, "format": "training_state",
        "files": [{"path": "../victim.txt", "bytes": len(VICTIM_BYTES), "checksum": None}],
    }))
    (ckpt / MANIFEST_NAME).unlink()
    (ckpt / HEAD_NAME).unlink(missing_ok=True)
    proc = cli("verify", str(ckpt), "--repair")
    assert proc.returncode == 0, proc.stderr
    assert "evil2.meta.json" in proc.stdout and "'../victim.txt'" in proc.stdout
    proc = cli("prune", str(ckpt), "--policy", prune_policy(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert_intact(victim)


# -- 2. symbolic and hard links --------------------------------------------------------------


def test_a_lock_file_that_is_a_symlink_is_not_written_through(tmp_path, ckpt, victim):
    (ckpt / LOCK_NAME).unlink()
    (ckpt / LOCK_NAME).symlink_to(victim)
    engine = Engine(CheckpointPolicy(dirpath=str(ckpt), monitor="val_loss"), extensions=EXT)
    with pytest.raises(CheckpointError, match="symbolic link") as caught:
        engine.start()
    assert "\n" not in str(caught.value)
    assert_intact(victim)
    assert_one_line_error(cli("prune", str(ckpt), "--policy", prune_policy(tmp_path)), 3, "symbolic link")
    assert_intact(victim)


def test_a_lock_file_hard_linked_to_another_file_is_not_emptied(tmp_path, ckpt, victim):
    (ckpt / LOCK_NAME).unlink()
    os.link(victim, ckpt / LOCK_NAME)
    engine = Engine(CheckpointPolicy(dirpath=str(ckpt), monitor="val_loss"), extensions=EXT)
    with pytest.raises(CheckpointError, match="hard links"):
        engine.start()
    assert_intact(victim)


def test_a_journal_that_is_a_symlink_gets_no_lines(tmp_path, victim):
    s, fw = session(tmp_path / "run", top_k=1)
    fit(s, fw, [0.5])
    journal = tmp_path / "run" / JOURNAL_NAME
    journal.unlink(missing_ok=True)
    journal.symlink_to(victim)
    s, fw = session(tmp_path / "run", top_k=1)
    with pytest.raises(CheckpointError, match="symbolic link"):
        fit(s, fw, [0.5, 0.4, 0.3])
    assert_intact(victim)


def test_a_symlinked_folder_in_a_record_path_is_refused(tmp_path, ckpt, victim):
    (ckpt / "link").symlink_to(tmp_path)
    rewrite_index(ckpt, set_first_path("link/victim.txt"))
    proc = cli("verify", str(ckpt))
    assert proc.returncode == 1 and "outside" in proc.stdout, proc.stdout + proc.stderr
    proc = cli("prune", str(ckpt), "--policy", prune_policy(tmp_path))
    assert_one_line_error(proc, 3, "outside", "link/victim.txt")
    assert_intact(victim)


def test_a_record_file_that_is_a_symlink_is_not_read(tmp_path, ckpt, victim):
    rewrite_index(ckpt, set_first_path("pointer.ckpt"))
    (ckpt / "pointer.ckpt").symlink_to(victim)
    proc = cli("verify", str(ckpt))
    assert proc.returncode == 1 and "symbolic link" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr
    assert_intact(victim)


def test_a_record_file_hard_linked_outside_loses_only_its_link(tmp_path, ckpt, victim):
    manifest = CheckpointDirectory(str(ckpt)).read_manifest()
    assert manifest is not None
    first = manifest.records[0].files[0].path
    (ckpt / first).unlink()
    os.link(victim, ckpt / first)
    proc = cli("prune", str(ckpt), "--policy", prune_policy(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert not (ckpt / first).exists()
    assert_intact(victim)


# -- 3. special files never make a command wait ------------------------------------------------


def special_file(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is
        except PermissionError:
            path.symlink_to("/dev/zero")
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "device", "link-to-device"])
def test_special_files_end_verify_and_ls_at_once(tmp_path, ckpt, kind):
    rewrite_index(ckpt, set_first_path("special.ckpt"))
    special_file(ckpt / "special.ckpt", kind)
    proc = cli("verify", str(ckpt))
    assert proc.returncode == 1 and "special.ckpt" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("ls", "--verify", str(ckpt))
    assert proc.returncode == 0 and "NO" in proc.stdout, proc.stdout + proc.stderr


def test_an_index_that_is_a_fifo_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / MANIFEST_NAME)
    assert_one_line_error(cli("ls", str(tmp_path / "d")), 3, "not a regular file")


# -- 4. names: long, case, Unicode -------------------------------------------------------------


def test_a_very_long_record_path_gives_a_short_message(tmp_path, ckpt, victim):
    rewrite_index(ckpt, set_first_path("x" * 5000))
    proc = cli("ls", str(ckpt))
    assert_one_line_error(proc, 3)
    assert len(proc.stderr) < 1000


@pytest.mark.parametrize("pair", [("Model.ckpt", "model.ckpt"), (unicodedata.normalize("NFC", "é.ckpt"), unicodedata.normalize("NFD", "é.ckpt"))])
def test_names_that_differ_only_in_case_or_normalisation_stay_apart(tmp_path, ckpt, pair):
    keep, drop = pair
    manifest = CheckpointDirectory(str(ckpt)).read_manifest()
    assert manifest is not None
    paths = [r.files[0].path for r in manifest.records]
    os.rename(ckpt / paths[0], ckpt / drop)  # epoch 0 (worst): pruned
    os.rename(ckpt / paths[2], ckpt / keep)  # epoch 2 (best): kept

    def change(data: dict[str, Any]) -> None:
        data["records"][0]["files"][0]["path"] = drop
        data["records"][2]["files"][0]["path"] = keep

    rewrite_index(ckpt, change)
    if os.path.samefile(ckpt / keep, ckpt / drop):
        pytest.skip("this filesystem folds case or normalisation")
    proc = cli("prune", str(ckpt), "--policy", prune_policy(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (ckpt / keep).exists() and not (ckpt / drop).exists()


# -- 5. faults: a torn journal line --------------------------------------------------------


def test_a_full_disk_during_a_journal_append_leaves_no_torn_line(tmp_path, monkeypatch):
    s, fw = session(tmp_path, top_k=-1)
    fit(s, fw, [0.5, 0.4])
    store = LocalStore(str(tmp_path))
    real_write = os.write
    calls = {"n": 0}

    def half_then_full(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    journal = tmp_path / JOURNAL_NAME
    before = journal.read_bytes() if journal.exists() else b""
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        store.append_bytes(JOURNAL_NAME, b"0123456789abcdef 1\n")
    monkeypatch.setattr(os, "write", real_write)
    assert journal.read_bytes() == before  # the half line was taken back
    assert CheckpointDirectory(str(tmp_path)).read_manifest() is not None


def test_a_torn_last_line_after_a_crash_is_dropped_with_a_warning(tmp_path, caplog):
    s, fw = session(tmp_path, top_k=-1)
    fit(s, fw, [0.5, 0.4])
    with open(tmp_path / JOURNAL_NAME, "ab") as f:
        f.write(b'4f2a {"commit": 9, "add": [')
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        manifest = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert manifest is not None and len(manifest.records) == 2
    assert any("incomplete line" in r.getMessage() for r in caplog.records)
    s, fw = session(tmp_path, top_k=-1)
    fit(s, fw, [0.5, 0.4, 0.3])  # the next run resumes and goes on
    assert fw.start is not None and fw.start.start_epoch == 2


# -- 6. a monitored value that is not a number -----------------------------------------------


@pytest.mark.parametrize("value", [None, "0.3", [1.0, 2.0]])
def test_a_monitored_value_that_is_not_a_number_is_named(tmp_path, caplog, value):
    s, _fw = session(tmp_path)
    s.begin()
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        s.epoch_end(0, 1, {"val_loss": value})
        s.epoch_end(1, 2, {"val_loss": value})
    s.end()
    warnings = [r.getMessage() for r in caplog.records if "not a number" in r.getMessage()]
    assert len(warnings) == 1 and type(value).__name__ in warnings[0]


# -- 7. checkpoints of another user --------------------------------------------------------


def give_away(path: Path) -> None:
    """Make `path` and what it holds belong to another user (only root can)."""
    if os.geteuid() != 0:
        pytest.skip("only root can give files to another user")
    for base, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(base, name), 65534, 65534, follow_symlinks=False)
    os.chown(path, 65534, 65534)


def test_resuming_from_another_users_checkpoints_is_refused_unless_trusted(tmp_path):
    s, fw = session(tmp_path / "run", top_k=1)
    fit(s, fw, [0.5, 0.4])
    give_away(tmp_path / "run")
    s, fw = session(tmp_path / "run", top_k=1)
    with pytest.raises(CheckpointError, match="belongs to user id 65534") as caught:
        fit(s, fw, [0.5, 0.4, 0.3])
    assert "\n" not in str(caught.value) and "trust_other_owners=True" in str(caught.value)
    assert fw.loaded == []  # nothing was loaded
    s, fw = session(tmp_path / "run", top_k=1, trust_other_owners=True)
    fit(s, fw, [0.5, 0.4, 0.3])
    assert fw.start is not None and fw.start.start_epoch == 2


# -- 8. found by trying: a swapped dirpath, special files at resume, numbers JSON cannot hold ---------


def test_dirpath_swapped_for_a_link_mid_run_writes_and_deletes_nothing_outside(tmp_path):
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MANIFEST_NAME).write_bytes(VICTIM_BYTES)
    s, _fw = session(shared / "run", top_k=1)
    s.begin()
    s.epoch_end(0, 1, {"val_loss": 0.5})
    os.rename(shared / "run", shared / "moved")
    (shared / "run").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="leads outside"):
        s.epoch_end(1, 2, {"val_loss": 0.4})
    s.end(failing=True)
    assert os.listdir(elsewhere) == [MANIFEST_NAME] and (elsewhere / MANIFEST_NAME).read_bytes() == VICTIM_BYTES


def test_a_fifo_in_place_of_the_newest_checkpoint_falls_back_without_waiting(tmp_path, caplog):
    s, fw = session(tmp_path, top_k=-1)
    fit(s, fw, [0.5, 0.4, 0.3])
    manifest = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert manifest is not None
    newest = max(manifest.records, key=lambda r: r.seq).files[0].path
    (tmp_path / newest).unlink()
    os.mkfifo(tmp_path / newest)
    s, fw = session(tmp_path, top_k=-1)
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        fit(s, fw, [0.5, 0.4, 0.3, 0.2])
    assert newest not in fw.loaded and fw.start is not None and fw.start.start_epoch == 2
    assert any("FIFO" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field", ["epoch", "bytes", "created"])
def test_numbers_json_cannot_hold_make_a_one_line_corrupt_index(tmp_path, ckpt, field):
    def change(data: dict[str, Any]) -> None:
        record = data["records"][0]
        target = record["files"][0] if field == "bytes" else record
        target[field] = float("inf") if field != "created" else float("nan")

    rewrite_index(ckpt, change)
    assert_one_line_error(cli("ls", str(ckpt)), 3, "is corrupt")


def test_a_lock_left_with_escape_sequences_is_shown_escaped(tmp_path, ckpt, caplog):
    (ckpt / LOCK_NAME).write_text(json.dumps({"pid": "\x1b]0;x\x07\x1b[2J", "host": "h\nFAKE", "started": 1}))
    engine = Engine(CheckpointPolicy(dirpath=str(ckpt), monitor="val_loss", top_k=-1), extensions=EXT)
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        engine.start()
    engine.close()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "taking over" in said and "\x1b" not in said and "\n" not in said and "\\x1b" in said


def test_another_users_file_beside_the_primary_one_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can give files to another user")
    s, fw = session(tmp_path, top_k=1)
    fit(s, fw, [0.5, 0.4])
    manifest = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert manifest is not None
    newest = max(manifest.records, key=lambda r: r.seq)
    (tmp_path / "extra.bin").write_bytes(b"planted")
    os.chown(tmp_path / "extra.bin", 65534, 65534)

    def change(data: dict[str, Any]) -> None:
        for record in data["records"]:
            if record["name"] == newest.name:
                record["files"].append({"path": "extra.bin", "bytes": 7, "checksum": None})

    rewrite_index(tmp_path, change)
    s, fw = session(tmp_path, top_k=1)
    with pytest.raises(CheckpointError, match="belongs to user id 65534"):
        fit(s, fw, [0.5, 0.4, 0.3])
    assert fw.loaded == []
