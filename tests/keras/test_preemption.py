"""Killed training processes: SIGKILL after a mid-epoch save, and a real SIGTERM, then the same command again.

Every first run starts at once, then every rerun: the two cores are shared, and TensorFlow's import dominates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from checkpoint_hooks.core import CheckpointDirectory, Record
from tests.index import read_index

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trigger_script.py")
EPOCHS = 4  # 4 steps an epoch: an uninterrupted run ends at step 16


@dataclass
class Run:
    code: int
    output: str
    seen: dict[str, Any] | None


def _start(dirpath: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(dirpath), str(out), "--epochs", str(EPOCHS), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], out: Path) -> Run:
    output, _ = proc.communicate(timeout=300)
    seen = json.loads(out.read_text(encoding="utf-8")) if out.exists() else None
    return Run(proc.returncode, output, seen)


def _sigterm_when_ready(procs: dict[Path, subprocess.Popen[str]]) -> None:
    """SIGTERM to each process once it wrote OUT.ready (it then waits for the signal)."""
    waiting = dict(procs)
    deadline = time.monotonic() + 240
    while waiting:
        for out, proc in list(waiting.items()):
            if Path(str(out) + ".ready").exists():
                proc.send_signal(signal.SIGTERM)
                del waiting[out]
            else:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no process got ready"
        time.sleep(0.05)


def _records(dirpath: Path) -> list[Record]:
    data = read_index(dirpath)
    return [Record.from_json(r) for r in data["records"]]


def _summary(dirpath: Path) -> list[tuple[str, list[str], int, int, bool]]:
    """(name without the loss value, tags, epoch, step, mid_epoch) per record."""
    return [(r.name.split("-loss=")[0], sorted(r.tags), r.epoch, r.step, r.mid_epoch) for r in _records(dirpath)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("preemption")
    kill, term, optout = base / "kill", base / "term", base / "optout"
    first = {
        "kill": _start(kill, base / "kill.json", "--every-n-steps", "3", "--kill-at-step", "6"),
        "term": _start(term, base / "term.json", "--ready-at-step", "6"),
        "optout": _start(optout, base / "optout.json", "--ready-at-step", "6", "--no-save-on-preemption"),
    }
    _sigterm_when_ready({base / "term.json": first["term"], base / "optout.json": first["optout"]})
    result: dict[str, Any] = {name: _finish(proc, base / f"{name}.json") for name, proc in first.items()}
    result.update({f"{name}_records": _summary(base / name) for name in first})
    result["term_preempted"] = [r for r in _records(term) if "preempted" in r.tags]
    result["term_verify"] = [CheckpointDirectory(str(term)).verify_record(r) for r in result["term_preempted"]]
    again = {
        "kill_again": _start(kill, base / "kill-again.json", "--every-n-steps", "3"),
        "term_again": _start(term, base / "term-again.json"),
    }
    result.update({name: _finish(proc, base / f"{name.replace('_', '-')}.json") for name, proc in again.items()})
    result.update({f"{name}_records": _summary(base / name.split("_")[0]) for name in again})
    return result


def test_sigkill_after_a_mid_epoch_save_restarts_that_epoch(runs: dict[str, Any]) -> None:
    killed = runs["kill"]
    assert killed.code == -signal.SIGKILL, killed.output
    assert killed.seen is None
    # Step 3 was saved mid-epoch 1, then replaced as the rolling last by epoch 1's end (step 4); step 6 is
    # the second batch of epoch 2.
    assert runs["kill_records"] == [
        ("epoch=001", ["best"], 0, 4, False),
        ("last-epoch=002-step=6", ["last"], 1, 6, True),
    ]
    again = runs["kill_again"]
    assert again.code == 0, again.output
    assert "Keras cannot skip batches, so epoch 2 starts over from its first batch" in again.output
    assert "trains on the 2 batch(es) it had trained before the save once more" in again.output
    assert again.seen is not None
    assert again.seen["iterations_at_start"] == 6
    # Epoch 2 runs again in full: 4 epochs in all, and 2 optimizer steps more than an uninterrupted run's 16.
    assert again.seen["epochs"] == [1, 2, 3]
    assert again.seen["iterations"] == 18
    assert again.seen["initial_epoch_after"] is None
    assert runs["kill_again_records"] == [("epoch=004", ["best", "last"], 3, 18, False)]


def test_sigterm_saves_a_preempted_training_state_and_the_rerun_resumes(runs: dict[str, Any]) -> None:
    term = runs["term"]
    assert term.code == -signal.SIGTERM, term.output
    assert term.seen is None  # fit() never returned: the process ended as SIGTERM ends it
    assert "SIGTERM received; saving a training state to resume from before the process ends" in term.output
    assert runs["term_records"] == [
        ("epoch=001", ["best"], 0, 4, False),
        ("preempted-epoch=002-step=6", ["last", "preempted"], 1, 6, True),
    ]
    (record,) = runs["term_preempted"]
    assert [f.path for f in record.files] == ["preempted-epoch=002-step=6.keras"]
    assert runs["term_verify"] == [[]]
    again = runs["term_again"]
    assert again.code == 0, again.output
    assert again.seen is not None
    assert again.seen["iterations_at_start"] == 6
    assert again.seen["epochs"] == [1, 2, 3]
    assert again.seen["iterations"] == 18
    # The preempted state was the resume point; the newer rolling last superseded it.
    assert runs["term_again_records"] == [("epoch=004", ["best", "last"], 3, 18, False)]


def test_save_on_preemption_false_leaves_sigterm_alone(runs: dict[str, Any]) -> None:
    optout = runs["optout"]
    assert optout.code == -signal.SIGTERM, optout.output
    assert optout.seen is None
    assert "SIGTERM received" not in optout.output
    assert runs["optout_records"] == [("epoch=001", ["best", "last"], 0, 4, False)]
