"""BestCheckpoint under ModelParallelStrategy: FSDP2 over 2 CPU processes (gloo), every rank writing its shards.

Lightning saves such a checkpoint as a folder (DCP shards, `.metadata`, `meta.pt`); BestCheckpoint keeps
its policy, index and auto-resume for it. (FSDPStrategy itself refuses a CPU accelerator.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from checkpoint_hooks.core import CheckpointDirectory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fit(dirpath: Path, epochs: int, out: Path, *extra: str) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "tests.lightning.model_parallel_script", "--dir", str(dirpath), "--epochs",
                           str(epochs), "--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{out}{rank}.json").read_text()) for rank in (0, 1)]


def records(dirpath: Path) -> list[Any]:
    manifest = CheckpointDirectory(str(dirpath)).read_manifest()
    assert manifest is not None
    return sorted(manifest.records, key=lambda r: r.seq)


def verify(dirpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "checkpoint_hooks.cli", "verify", str(dirpath)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)


def test_sharded_checkpoints_keep_the_policy_and_resume_bit_identical(tmp_path: Path) -> None:
    full = fit(tmp_path / "full", 4, tmp_path / "full-")
    first = fit(tmp_path / "split", 2, tmp_path / "first-")
    kept = records(tmp_path / "split")
    for record in kept:  # one folder per checkpoint, both ranks' shards in it, every file checksummed
        assert record.folder == record.name + ".ckpt"
        names = {f.path[len(record.folder) + 1 :] for f in record.files}
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"} <= names
        assert all(f.checksum for f in record.files)
    again = fit(tmp_path / "split", 4, tmp_path / "again-")
    for rank in (0, 1):
        assert again[rank]["trained"] == [2, 3]
        assert again[rank]["start"] == first[rank]["end"]  # this rank's shards, as saved
        assert again[rank]["end"] == full[rank]["end"]  # and its random states: as if never stopped
    assert [(r.name, sorted(r.tags)) for r in records(tmp_path / "split")] == [
        (r.name, sorted(r.tags)) for r in records(tmp_path / "full")
    ]
    checked = verify(tmp_path / "split")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_corrupt_shard_makes_both_ranks_resume_from_the_previous_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "d"
    fit(d, 2, tmp_path / "first-")
    older, newest = records(d)
    shard = d / next(f.path for f in newest.files if f.path.endswith("__1_0.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "__1_0.distcp" in verify(d).stdout
    again = fit(d, 4, tmp_path / "again-")
    assert [r["trained"] for r in again] == [[older.epoch + 1, 2, 3]] * 2


def test_with_save_last_last_ckpt_is_a_folder_of_the_newest_checkpoints_files(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"  # only ModelCheckpoint's arguments: the index lies beside, dirpath holds checkpoints alone
    first = fit(d, 2, tmp_path / "first-", "--save-last")
    assert first[0]["last"] == str(d / "last.ckpt")

    def same_files(alias: Path, target: Path) -> None:
        names = sorted(p.name for p in alias.iterdir())
        assert names == sorted(p.name for p in target.iterdir()) and "__1_0.distcp" in names
        assert all((alias / n).stat().st_ino == (target / n).stat().st_ino for n in names)  # hard links

    newest = records(d)[-1]
    same_files(d / "last.ckpt", d / newest.folder)
    again = fit(d, 3, tmp_path / "again-", "--save-last")
    assert [r["trained"] for r in again] == [[2], [2]]
    same_files(d / "last.ckpt", d / records(d)[-1].folder)
    assert sorted(os.listdir(d)) == sorted([*(r.folder for r in records(d)), "last.ckpt"])
