"""Every script under examples/ runs (each in its own process, so frameworks never share one)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(script, *args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_toy_training_resumes(tmp_path):
    first = run("toy_training.py", "--dir", "ckpt", "--epochs", "4", "--crash-after-epoch", "1", cwd=tmp_path)
    assert first.returncode == 17
    second = run("toy_training.py", "--dir", "ckpt", "--epochs", "4", cwd=tmp_path)
    assert second.returncode == 0 and "resuming from" in second.stderr
    assert json.loads(second.stdout.splitlines()[-1])["epoch"] == 3


def test_lightning_quickstart_runs_twice(tmp_path):
    first = run("lightning_quickstart.py", "--epochs", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run("lightning_quickstart.py", "--epochs", "3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "saved epoch 2 " in second.stderr and "saved epoch 0 " not in second.stderr


def test_torch_quickstart_runs_twice(tmp_path):
    first = run("torch_quickstart.py", "--epochs", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run("torch_quickstart.py", "--epochs", "3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    assert "saved epoch 2 " in second.stderr and "saved epoch 0 " not in second.stderr


def test_demo_quick_runs_every_framework_and_resumes(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--quick", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the kill lands mid-run: when it came, the last epoch was not committed yet
    at_kill = re.findall(r"killed with SIGKILL after epoch 1 was committed .*; committed then: epochs \[([\d, ]*)\]", proc.stdout)
    assert len(at_kill) == 4, proc.stdout[-3000:]
    assert all(max(int(e) for e in epochs.split(",")) < 3 for epochs in at_kill), at_kill
    for name in ("lightning", "keras", "paddle", "torch"):
        assert (tmp_path / "out" / name / f"{name}.png").stat().st_size > 10_000
        manifest = json.loads((tmp_path / "out" / name / "checkpoints" / "manifest.json").read_text())
        assert max(r["epoch"] for r in manifest["records"]) == 3
        # one run, continued: every epoch 0-3 is in the history exactly once
        assert sorted(h["epoch"] for h in manifest["history"]) == [0, 1, 2, 3]
    assert proc.stdout.count("killed with SIGKILL after epoch 1") == 4
