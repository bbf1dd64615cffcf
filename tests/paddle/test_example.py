"""examples/paddle_quickstart.py runs, and its second run continues the first."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.paddle.toy import manifest_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_continues_on_the_second_run(tmp_path):
    script = os.path.join(ROOT, "examples", "paddle_quickstart.py")
    directory = str(tmp_path / "ck")
    env = dict(os.environ, PYTHONPATH=ROOT)
    runs = [
        subprocess.run([sys.executable, script, "--epochs", str(epochs), "--dir", directory], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=300, check=False)
        for epochs in (2, 3)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming at epoch" not in runs[0].stderr
    assert "resuming at epoch 2: epochs 0-1 are done" in runs[1].stderr
    assert max(r["epoch"] for r in manifest_records(directory)) == 2
