"""Under tf.distribute.MirroredStrategy (2 logical CPUs) the chief writes each checkpoint once and resumes in scope.

Logical devices must be configured before TensorFlow initialises, so this runs
in a subprocess. Keras 3's fit() does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so a non-chief worker cannot run here; the last test shows its part in one
process told that it is not the chief.
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

from checkpoint_hooks.keras import BestCheckpoint
from checkpoint_hooks.keras.framework import KerasFramework
from tests.index import read_index
from tests.keras.helpers import data, listing, make_model

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


def test_a_worker_that_is_not_the_chief_saves_into_scratch_files_and_resumes_from_the_chiefs_choice(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-chief worker (multi-worker tf.distribute, multi-process JAX) cannot be run here; its part is shown
    by telling one process that it is not the chief. Keras cannot hand the chief's decisions to the others, so
    each worker plans alike and writes (saving may be collective), but into scratch files: the directory is the
    chief's alone. It resumes from the checkpoint the chief resumes from, read from the directory."""
    def checkpoint() -> BestCheckpoint:
        return BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="m{epoch}", every_n_steps=3)

    x, y = data()
    model = make_model()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[checkpoint()])
    chiefs = listing(str(tmp_path))
    index = (tmp_path / "manifest.json").read_bytes()

    written: list[str] = []
    write = KerasFramework.write
    monkeypatch.setattr(KerasFramework, "is_writer", lambda self: False)
    monkeypatch.setattr(KerasFramework, "write", lambda self, item, path: (written.append(path), write(self, item, path)))
    worker = make_model(seed=1)
    seen: list[int] = []
    probe = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append(int(worker.optimizer.iterations)))
    history = worker.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[checkpoint(), probe])

    assert history.epoch == [2] and seen == [8]  # the chief's newest: epoch 2 (1-based), step 8
    assert [os.path.basename(p) for p in written] == ["last-epoch=003-step=9.keras", "m3.keras"]
    assert not [p for p in written if p.startswith(str(tmp_path))]
    assert listing(str(tmp_path)) == chiefs and (tmp_path / "manifest.json").read_bytes() == index
    # A checkpoint named by path: every worker loads it.
    named = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="m{epoch}", resume=str(tmp_path / "m2.keras"))
    history = make_model(seed=2).fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[named])
    assert history.epoch == [2]
    assert listing(str(tmp_path)) == chiefs and (tmp_path / "manifest.json").read_bytes() == index
