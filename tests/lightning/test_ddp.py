"""DDP with 2 CPU processes (gloo): one writer, one decision, and resume."""

from __future__ import annotations

import json

from tests.lightning.test_resume import assert_same_state, listing, run_script


def test_ddp_single_writer_and_resume(tmp_path):
    args = ["--strategy", "ddp", "--devices", "2"]
    full = run_script("--dir", str(tmp_path / "full"), "--epochs", "3", "--out", str(tmp_path / "full.pt"), *args)
    assert full.returncode == 0, full.stderr[-3000:]
    first = run_script("--dir", str(tmp_path / "split"), "--epochs", "2", "--out", str(tmp_path / "first.pt"), *args)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_script("--dir", str(tmp_path / "split"), "--epochs", "3", "--out", str(tmp_path / "split.pt"), *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["global_step"] == 3 * 2  # 32 samples / 2 ranks / batch 8
    assert_same_state(tmp_path / "full.pt", tmp_path / "split.pt")
    # One writer: a second rank writing would have met the directory lock or duplicated names.
    assert listing(tmp_path / "full") == listing(tmp_path / "split")
    names = [name for name, _ in listing(tmp_path / "full")]
    assert len(names) == len(set(names)) and not any("-v1" in n for n in names)
