"""A run killed with SIGKILL after epoch k and started again ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np

from tests.index import read_index
from tests.keras.helpers import listing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_script.py")
EPOCHS = 6
KILL_AFTER = 2  # 0-based: the third epoch's save is committed, then the process dies


def _start(dirpath: str, out: str, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(
        [sys.executable, SCRIPT, dirpath, str(EPOCHS), out, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def _result(out: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    with open(out, encoding="utf-8") as f:
        seen = json.load(f)
    with np.load(out + ".npz") as arrays:
        weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return seen, weights


def _records(dirpath: str) -> list[tuple[str, list[str], int, int]]:
    data = read_index(dirpath)
    return [(r["name"], r["tags"], r["epoch"], r["step"]) for r in data["records"]]


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path: Any) -> None:
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full_out, cut_out = str(tmp_path / "full.json"), str(tmp_path / "cut.json")
    # The uninterrupted run and the run that gets killed use both cores at once.
    full = _start(full_dir, full_out)
    killed = _start(cut_dir, cut_out, "--kill-after-epoch", str(KILL_AFTER))
    code, output = _finish(killed)
    assert code == -signal.SIGKILL, output
    assert not os.path.exists(cut_out)
    killed_records = _records(cut_dir)
    assert max(epoch for _name, _tags, epoch, _step in killed_records) == KILL_AFTER

    resumed = _start(cut_dir, cut_out)  # the same command again
    code, output = _finish(full)
    assert code == 0, output
    code, output = _finish(resumed)
    assert code == 0, output

    full_seen, full_weights = _result(full_out)
    cut_seen, cut_weights = _result(cut_out)
    assert full_seen["epochs"] == list(range(EPOCHS))
    assert cut_seen["epochs"] == list(range(KILL_AFTER + 1, EPOCHS))
    # Optimizer state and the callback's best score came back before the first resumed epoch.
    assert cut_seen["iterations_at_start"] == (KILL_AFTER + 1) * 4
    assert cut_seen["best_at_start"] == min(full_seen["val_loss"][: KILL_AFTER + 1])
    assert cut_seen["iterations"] == full_seen["iterations"] == EPOCHS * 4
    assert cut_seen["val_loss"] == full_seen["val_loss"][KILL_AFTER + 1 :]
    assert len(cut_weights) == len(full_weights)
    for ours, theirs in zip(cut_weights, full_weights):
        assert np.array_equal(ours, theirs)
    assert cut_seen["best"] == full_seen["best"]
    assert cut_seen["best_model_path"] == full_seen["best_model_path"]
    assert cut_seen["initial_epoch_after"] is None
    # Retention went on as if nothing happened: the same checkpoints, the same roles.
    strip = lambda names: [n for n in names if n != ".checkpoint_hooks.lock"]  # noqa: E731
    assert strip(listing(cut_dir)) == strip(listing(full_dir))
    assert [(n, t, e, s) for n, t, e, s in _records(cut_dir)] == _records(full_dir)
