"""Under tf.distribute.MirroredStrategy (2 logical CPUs) the chief writes each checkpoint once and resumes in scope.

Logical devices must be configured before TensorFlow initialises, so this runs
in a subprocess. Keras 3's fit() does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so a non-chief worker cannot be exercised here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import keras
import numpy as np
import pytest

from tests.index import read_index

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mirrored_script.py")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute needs the TensorFlow backend")
def test_mirrored_strategy_chief_writes_once_and_resumes(tmp_path: Any) -> None:
    dirpath, out = str(tmp_path / "ck"), str(tmp_path / "report.json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, SCRIPT, dirpath, out],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout
    with open(out, encoding="utf-8") as f:
        report = json.load(f)
    assert report["replicas"] == 2 and report["strategy"] == "MirroredStrategy"
    assert report["writer"] is True
    assert report["first_epochs"] == [0, 1]
    # One record per epoch end: a second writer would have collided on the lock or left "-v1" copies.
    records = read_index(dirpath)["records"]
    assert all("-v" not in r["name"] for r in records)
    assert report["second_epochs"] == [2]
    assert report["iterations_at_resume"] == report["iterations_after_first"] == 8  # 2 epochs x 4 global batches of 8
    for resumed, saved in zip(report["weights_at_resume"], report["weights_after_first"]):
        assert np.array_equal(np.asarray(resumed), np.asarray(saved))
    assert report["staging_left"] == []
    names = {r["name"] for r in records}
    assert "m3" in names and report["files_after_second"].count("m3.keras") == 1
