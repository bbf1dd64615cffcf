"""A real SIGTERM to a training process: a training state tagged preempted is saved, the rerun resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from tests.index import read_index
from tests.lightning.test_resume import ROOT, run_script


def test_sigterm_saves_a_preempted_training_state_and_the_rerun_resumes(tmp_path):
    out = str(tmp_path / "final.pt")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lightning.train_script", "--dir", str(tmp_path / "ckpt"), "--epochs", "4",
         "--out", out, "--signal-ready-at-step", "6"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(out + ".ready"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert not os.path.exists(out), "training should have stopped"
    assert "SIGTERMException stopped training; saving a training state to resume from" in stderr
    records = read_index(tmp_path / "ckpt")["records"]
    (preempted,) = [r for r in records if "preempted" in r["tags"]]
    assert preempted["mid_epoch"] and preempted["name"].startswith("preempted-epoch=001-step=")
    assert "last" in preempted["tags"] and 6 <= preempted["step"] < 8
    resumed = run_script("--dir", str(tmp_path / "ckpt"), "--epochs", "4", "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(out)["global_step"] == 16  # the same step count as an uninterrupted run
    records = read_index(tmp_path / "ckpt")["records"]
    assert not any("preempted" in r["tags"] for r in records)  # superseded by the newer last
