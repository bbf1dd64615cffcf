"""Automatic resume: in-process, after SIGKILL in a subprocess, from a corrupt newest, and on two ranks."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import paddle
import pytest

from checkpoint_hooks.core import resume_state
from checkpoint_hooks.paddle import STATE_KEY, BestCheckpoint
from checkpoint_hooks.paddle.io import paddle_rng_state, set_paddle_rng_state
from checkpoint_hooks.policy import PolicyError
from tests.paddle.toy import (
    VAL_OFFSETS,
    Recorder,
    Regression,
    listing,
    manifest_records,
    portable_state,
    regression_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fit(directory: str, epochs: int, seed: int = 0, model=None, **options) -> tuple[BestCheckpoint, Recorder, object]:
    model = model if model is not None else regression_model(seed)
    eval_data = Regression(16, seed=1, offsets=VAL_OFFSETS)
    recorder = Recorder(eval_data)
    options.setdefault("monitor", "val_loss")
    options.setdefault("top_k", 2)
    callback = BestCheckpoint(dirpath=directory, **options)
    model.fit(Regression(), eval_data, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[callback, recorder])
    return callback, recorder, model


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert different == []


def test_resume_in_the_same_process_continues_bitwise(tmp_path):
    _, _, reference = fit(str(tmp_path / "a"), epochs=5)
    fit(str(tmp_path / "b"), epochs=2)
    # A second network in this process gets new unique parameter names (linear_N): the
    # optimizer state is mapped onto them through the structured names.
    model = regression_model(seed=7)
    assert {p.name for p in model.network.parameters()}.isdisjoint(p.name for p in reference.network.parameters())
    callback, recorder, model = fit(str(tmp_path / "b"), epochs=5, model=model)

    assert recorder.trained == [2, 3, 4]
    assert callback.resumed_from is not None and callback.resumed_from.epoch == 1
    assert callback.start_epoch == 2
    assert_same_state(portable_state(model), portable_state(reference))
    assert listing(str(tmp_path / "b")) == listing(str(tmp_path / "a"))
    assert manifest_records(str(tmp_path / "b")) == manifest_records(str(tmp_path / "a"))
    assert "_run_one_epoch" not in model.__dict__


def test_corrupt_newest_is_skipped_with_a_warning(tmp_path, caplog):
    directory = str(tmp_path / "ck")
    _, _, reference = fit(str(tmp_path / "ref"), epochs=4, monitor=None, top_k=-1)
    fit(directory, epochs=3, monitor=None, top_k=-1)
    newest = os.path.join(directory, "epoch=002-step=12.pdopt")
    with open(newest, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))

    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        callback, recorder, model = fit(directory, epochs=4, seed=9, monitor=None, top_k=-1)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "skipping checkpoint" in m and "epoch=002-step=12" in m and "checksum mismatch" in m for m in warnings
    ), warnings
    assert callback.resumed_from.name == "epoch=001-step=8"
    assert recorder.trained == [2, 3]
    assert [r["name"] for r in manifest_records(directory)] == [
        "epoch=000-step=4", "epoch=001-step=8", "epoch=002-step=12", "epoch=003-step=16"
    ]
    assert callback.engine.problems(callback.engine.manifest.by_name("epoch=002-step=12")) == []
    assert_same_state(portable_state(model), portable_state(reference))


def test_explicit_path_resumes_a_model_that_trained_before(tmp_path):
    _, _, reference = fit(str(tmp_path / "a"), epochs=4, monitor=None, top_k=-1)
    model = regression_model(seed=5)
    fit(str(tmp_path / "c"), epochs=1, model=model, monitor=None, top_k=-1)  # its optimizer has state now
    source = str(tmp_path / "a" / "epoch=001-step=8.pdparams")
    _, recorder, model = fit(str(tmp_path / "c"), epochs=4, model=model, monitor=None, top_k=-1, resume=source)

    assert recorder.trained == [2, 3]
    assert_same_state(portable_state(model), portable_state(reference))
    # The earlier run's checkpoint stays; this run's are numbered by the true epoch and step.
    assert [r["name"] for r in manifest_records(str(tmp_path / "c"))] == [
        "epoch=000-step=4", "epoch=002-step=12", "epoch=003-step=16"
    ]


def test_resume_never_starts_over(tmp_path):
    fit(str(tmp_path), epochs=2, monitor=None, top_k=1)
    callback, recorder, _ = fit(str(tmp_path), epochs=2, monitor=None, top_k=1, resume="never")
    assert recorder.trained == [0, 1]
    assert callback.resumed_from is None
    # Each run keeps its own newest; the earlier run's checkpoint is left alone.
    assert [r["name"] for r in manifest_records(str(tmp_path))] == ["epoch=001-step=8", "epoch=001-step=8-v1"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "tests.paddle.run_fit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def load(out: str) -> tuple[dict, dict[str, np.ndarray]]:
    with open(out + ".json", encoding="utf-8") as f:
        info = json.load(f)
    with np.load(out + ".npz") as data:
        return info, {k: data[k] for k in data.files}


@pytest.mark.parametrize("variant", ["plain", "shuffled"])
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, variant):
    """shuffled adds shuffle=True, dropout and a per-epoch LR schedule to the StepDecay run."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    done = run_script("--dir", full, "--out", full, "--variant", variant)
    assert done.returncode == 0, done.stderr
    killed = run_script("--dir", part, "--out", part + "-killed", "--variant", variant, "--kill-after", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not os.path.exists(part + "-killed.json")
    assert max(r["epoch"] for r in manifest_records(part)) == 2
    resumed = run_script("--dir", part, "--out", part, "--variant", variant, "--seed", "3")
    assert resumed.returncode == 0, resumed.stderr

    full_info, full_state = load(full)
    info, state = load(part)
    assert full_info["trained"] == [0, 1, 2, 3, 4, 5]
    assert info["trained"] == [3, 4, 5]  # fit(epochs=6) ended after epoch 5 in total
    assert info["resumed_from"].startswith("epoch=002-")
    assert_same_state(state, full_state)  # parameters, Adam moments and beta powers, LR scheduler
    # Retention went on as if the run had never stopped: the same records, tags and files.
    assert info["records"] == full_info["records"]
    assert [(r["epoch"], r["step"], r["tags"]) for r in info["records"]] == [
        (1, 8, ["best"]), (3, 16, ["best"]), (5, 24, ["last", "snapshot"])
    ]
    assert info["listing"] == full_info["listing"]

    if variant == "plain":
        # Once every epoch is done, running the script again trains nothing and ends with the same state.
        again = run_script("--dir", part, "--out", part + "-again", "--variant", variant, "--seed", "4")
        assert again.returncode == 0, again.stderr
        again_info, again_state = load(part + "-again")
        assert again_info["trained"] == []
        assert again_info["records"] == full_info["records"]
        assert_same_state(again_state, full_state)


def launch(tmp_path, directory: str, epochs: int, out: str) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PADDLE_TRAINER_ID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(tmp_path / "logs"), os.path.join(ROOT, "tests", "paddle", "run_dist.py"),
         directory, str(epochs), out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    logs = ""
    if (tmp_path / "logs").is_dir():
        for name in sorted(os.listdir(tmp_path / "logs")):
            with open(tmp_path / "logs" / name, encoding="utf-8", errors="replace") as f:
                logs += f"--- {name}\n" + f.read()[-3000:]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs


def test_two_ranks_write_once_and_resume_together(tmp_path):
    part, full = str(tmp_path / "part"), str(tmp_path / "full")
    launch(tmp_path, part, 2, part + "-first")
    launch(tmp_path, part, 3, part)
    launch(tmp_path, full, 3, full)

    ranks = [load_rank(part, r) for r in (0, 1)]
    assert [info["writer"] for info, _ in ranks] == [True, False]
    for info, _ in ranks:
        assert info["world_size"] == 2
        assert info["trained"] == [2]
        # 32 samples, batch 8, two ranks: 2 steps per epoch on each.
        assert info["resumed_from"] == "epoch=001-step=4"
    reference = load_rank(full, 0)[1]
    for _, state in ranks:
        assert_same_state(state, reference)
    # One record per epoch: only rank 0 wrote.
    assert [r["name"] for r in manifest_records(part)] == ["epoch=000-step=2", "epoch=001-step=4", "epoch=002-step=6"]
    # The random states of both ranks are in it: each rank restores its own.
    payload = resume_state.read(paddle.load(os.path.join(part, "epoch=002-step=6.pdopt"))[STATE_KEY])
    assert payload is not None and payload.extra["world_size"] == 2
    assert [sorted(r) for r in payload.rng] == [["numpy", "paddle", "python"]] * 2
    assert listing(part) == listing(full)


def load_rank(out: str, rank: int) -> tuple[dict, dict[str, np.ndarray]]:
    return load(f"{out}.rank{rank}")


def test_explicit_path_to_a_model_save_prefix_loads_it_and_counts_from_zero(tmp_path, caplog):
    _, _, reference = fit(str(tmp_path / "ref"), epochs=4, monitor=None, top_k=1)
    _, _, earlier = fit(str(tmp_path / "earlier"), epochs=2, monitor=None, top_k=1)
    earlier.save(str(tmp_path / "hapi" / "ck"))  # hapi's own training checkpoint: no epoch in it
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        callback, recorder, model = fit(str(tmp_path / "c"), epochs=2, seed=5, monitor=None, top_k=1,
                                        resume=str(tmp_path / "hapi" / "ck"))
    assert any("does not say which epoch it ends" in r.getMessage() for r in caplog.records)
    assert recorder.trained == [0, 1]
    assert callback.resumed_from is None
    assert_same_state(portable_state(model), portable_state(reference))
    with pytest.raises(PolicyError, match=r"resume must be 'auto', 'never' or an existing checkpoint; 'nowhere' does not exist"):
        fit(str(tmp_path / "d"), epochs=1, monitor=None, top_k=1, resume="nowhere")


class RngProbe(paddle.callbacks.Callback):
    """The random states of Python, NumPy and Paddle when `epoch` begins (listed after BestCheckpoint)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch
        self.states: tuple | None = None

    def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
        if epoch == self.epoch:
            numpy_state = np.random.get_state()
            self.states = (random.getstate(), numpy_state[1].tolist(), numpy_state[2:],
                           [g.__getstate__() for g in paddle.get_rng_state()])


def write_earlier_layout(source: str, old: str, version: int) -> None:
    """The training state `source` as versions 1 and 2 of this callback wrote it, at `old`.

    Both pickled the random states ({"paddle": GeneratorStates, "numpy": ..., "python": ...});
    version 2 kept them and the other fields under STATE_KEY of the .pdopt, version 1 in
    `<name>.pdrng` and `<name>.state.json` beside the .pdparams.
    """
    os.makedirs(os.path.dirname(old), exist_ok=True)
    shutil.copyfile(source + ".pdparams", old + ".pdparams")
    optimizer = paddle.load(source + ".pdopt")
    payload = resume_state.read(optimizer.pop(STATE_KEY))
    rng = payload.rng_of(0)
    set_paddle_rng_state(rng, source)
    python, numpy_state = rng["python"], rng["numpy"]
    pickled = pickle.dumps({
        "paddle": paddle.get_rng_state(),
        "numpy": (numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32), *numpy_state[2:]),
        "python": (python[0], tuple(python[1]), python[2]),
    })
    fields = {"version": version, "epoch": payload.epoch, "global_step": payload.step, **payload.extra}
    if version == 2:
        optimizer[STATE_KEY] = {**fields, "mid_epoch": payload.mid_epoch, "epoch_step": payload.epoch_step,
                                "rng": pickled}
        paddle.save(optimizer, old + ".pdopt")
        return
    paddle.save(optimizer, old + ".pdopt")
    with open(old + ".pdrng", "wb") as f:
        f.write(pickled)
    with open(old + ".state.json", "w", encoding="utf-8") as f:
        json.dump(fields, f)


@pytest.mark.parametrize("version", [1, 2, "current"])
def test_explicit_path_to_a_training_state_of_every_release_resumes_at_its_epoch(tmp_path, version):
    """Earlier layouts of the payload resume as the current one does: weights, optimizer and random states."""
    def run(directory: str, epochs: int, seed: int, **options) -> tuple[Recorder, RngProbe, paddle.Model]:
        model = regression_model(seed)
        recorder, probe = Recorder(), RngProbe(2)
        callback = BestCheckpoint(dirpath=directory, monitor=None, top_k=-1, **options)
        model.fit(Regression(), batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[callback, recorder, probe])
        return recorder, probe, model

    _, reference_rng, reference = run(str(tmp_path / "ref"), 4, 0)
    run(str(tmp_path / "a"), 2, 0)
    source, old = str(tmp_path / "a" / "epoch=001-step=8"), str(tmp_path / "old" / "ck")
    if version == "current":
        old = source
    else:
        write_earlier_layout(source, old, version)

    recorder, probe, model = run(str(tmp_path / "c"), 4, 5, resume=old + ".pdparams")
    assert recorder.trained == [2, 3]
    assert_same_state(portable_state(model), portable_state(reference))
    assert reference_rng.states is not None and probe.states == reference_rng.states
    assert [r["name"] for r in manifest_records(str(tmp_path / "c"))] == ["epoch=002-step=12", "epoch=003-step=16"]


def test_paddle_random_states_are_plain_data_that_restore_the_same_draws():
    paddle.seed(3)
    paddle.rand([5])
    saved = paddle_rng_state()
    assert json.loads(json.dumps(saved)) == saved
    expected = paddle.rand([4]).numpy()
    paddle.seed(11)
    set_paddle_rng_state(saved, "test")
    assert np.array_equal(paddle.rand([4]).numpy(), expected)
