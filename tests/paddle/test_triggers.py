"""Step and time saves mid-epoch, saves on preemption (a real SIGTERM, an exception escaping fit()), and resuming from them.

The toy regression has 4 batches an epoch, so global step 4e+b is batch b of epoch e (b = 1..4).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import paddle
import pytest

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.paddle import STATE_KEY, BestCheckpoint
from tests.index import read_index
from tests.paddle.run_preempt import SigtermAt
from tests.paddle.toy import Recorder, Regression, listing, portable_state, regression_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATE = (".pdparams", ".pdopt")


class Lasts(paddle.callbacks.Callback):
    """Each rolling last the checkpoint callback (listed before this one) saved, as it first appeared.

    Step and time saves land between batches, so they show at the next batch begin (or at the
    epoch end after the last batch); epoch saves show at the next epoch begin or the fit's end.
    """

    def __init__(self, checkpoint: BestCheckpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.seen: list[tuple[str, int, bool, list[str], int | None]] = []

    def look(self, *args: Any, **kwargs: Any) -> None:
        engine = self.checkpoint.engine
        record = engine.last_record if engine is not None else None
        if record is None or (self.seen and self.seen[-1][0] == record.name):
            return
        state = paddle.load(engine.path_of(record).removesuffix(".pdparams") + ".pdopt")[STATE_KEY]
        assert state["mid_epoch"] == record.mid_epoch and state["step"] == record.step
        self.seen.append((record.name, record.step, record.mid_epoch, sorted(record.tags), state["epoch_step"]))

    on_train_batch_begin = on_epoch_begin = on_epoch_end = on_train_end = look


class RaiseBefore(paddle.callbacks.Callback):
    """Raises `error` when training batch number `batch` of this fit (1-based) begins."""

    def __init__(self, batch: int, error: BaseException) -> None:
        super().__init__()
        self.batch = batch
        self.error = error
        self.seen = 0

    def on_train_batch_begin(self, step: int, logs: Any = None) -> None:
        self.seen += 1
        if self.seen == self.batch:
            raise self.error


def fit(directory: str, epochs: int, *extra: paddle.callbacks.Callback, model: Any = None, **options: Any):
    model = model if model is not None else regression_model(0)
    options.setdefault("top_k", -1)
    callback = BestCheckpoint(dirpath=directory, **options)
    lasts, recorder = Lasts(callback), Recorder()
    model.fit(Regression(), batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[callback, lasts, recorder, *extra])
    return callback, lasts, recorder, model


def manifest(directory: str) -> dict[str, Any]:
    return read_index(directory)


def records(directory: str) -> list[tuple[str, int, int, bool, list[str]]]:
    return [(r["name"], r["epoch"], r["step"], r["mid_epoch"], sorted(r["tags"])) for r in manifest(directory)["records"]]


def files(*names: str, lock: bool = True) -> list[str]:
    out = ["manifest.head", "manifest.json"] + ([".checkpoint_hooks.lock"] if lock else [])
    for name in names:
        out += [name + ".meta.json"] + [name + ext for ext in STATE]
    return sorted(out)


def test_every_n_steps_saves_mid_epoch_and_the_epoch_end_serves_the_last_batch(tmp_path):
    directory = str(tmp_path)
    _, lasts, _, _ = fit(directory, 3, every_n_steps=3)

    # Steps 3, 6 and 9 fall inside epochs 0, 1 and 2; step 12 is epoch 2's last batch, saved by its epoch end.
    assert lasts.seen == [
        ("last-epoch=000-step=3", 3, True, ["last"], 3),
        ("epoch=000-step=4", 4, False, ["best", "last"], None),
        ("last-epoch=001-step=6", 6, True, ["last"], 2),
        ("epoch=001-step=8", 8, False, ["best", "last"], None),
        ("last-epoch=002-step=9", 9, True, ["last"], 1),
        ("epoch=002-step=12", 12, False, ["best", "last"], None),
    ]
    # Each mid-epoch last was pruned by the next last; the history holds epochs, not step saves.
    assert records(directory) == [
        ("epoch=000-step=4", 0, 4, False, ["best"]),
        ("epoch=001-step=8", 1, 8, False, ["best"]),
        ("epoch=002-step=12", 2, 12, False, ["best", "last"]),
    ]
    assert [(h["epoch"], h["step"]) for h in manifest(directory)["history"]] == [(0, 4), (1, 8), (2, 12)]
    assert listing(directory) == files("epoch=000-step=4", "epoch=001-step=8", "epoch=002-step=12")


def test_a_step_save_on_an_epochs_last_batch_without_last_is_made_at_the_epoch_end(tmp_path):
    directory = str(tmp_path)
    _, lasts, _, _ = fit(directory, 2, every_n_steps=4, format="weights", last=False, top_k=1)
    assert [entry[:4] for entry in lasts.seen] == [
        ("last-epoch=000-step=4", 4, False, ["last"]),
        ("last-epoch=001-step=8", 8, False, ["last"]),
    ]
    assert records(directory) == [
        ("epoch=001-step=8", 1, 8, False, ["best"]),
        ("last-epoch=001-step=8", 1, 8, False, ["last"]),
    ]


def test_every_n_minutes_saves_when_the_time_has_passed(tmp_path):
    # A tiny interval has always passed: every point between two batches saves, once per step.
    _, lasts, _, _ = fit(str(tmp_path / "often"), 2, every_n_minutes=1e-9, top_k=1)
    assert [entry[:3] for entry in lasts.seen] == [
        ("last-epoch=000-step=1", 1, True),
        ("last-epoch=000-step=2", 2, True),
        ("last-epoch=000-step=3", 3, True),
        ("epoch=000-step=4", 4, False),
        ("last-epoch=001-step=5", 5, True),
        ("last-epoch=001-step=6", 6, True),
        ("last-epoch=001-step=7", 7, True),
        ("epoch=001-step=8", 8, False),
    ]
    _, lasts, _, _ = fit(str(tmp_path / "rarely"), 2, every_n_minutes=60, top_k=1)
    assert [entry[0] for entry in lasts.seen] == ["epoch=000-step=4", "epoch=001-step=8"]


@pytest.mark.parametrize("error", [RuntimeError("data went bad"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_an_exception_escaping_fit_saves_a_preempted_state_and_the_rerun_starts_that_epoch_over(
    tmp_path, caplog, error
):
    directory = str(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(type(error)), caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        fit(directory, 3, RaiseBefore(7, error))  # after 6 batches: epoch 1, batch 2
    assert f"{type(error).__name__} stopped training; saving a training state to resume from" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == before
    assert records(directory) == [
        ("epoch=000-step=4", 0, 4, False, ["best"]),
        ("preempted-epoch=001-step=6", 1, 6, True, ["last", "preempted"]),
    ]
    checkpoints = CheckpointDirectory(directory)
    record = checkpoints.load().by_name("preempted-epoch=001-step=6")
    assert checkpoints.verify_record(record) == []

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="checkpoint_hooks"):
        callback, _, recorder, model = fit(directory, 3, model=regression_model(5))
    assert callback.resumed_from.name == "preempted-epoch=001-step=6"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "resumed from preempted-epoch=001-step=6.pdparams, saved during epoch 1 at step 6; Paddle cannot skip "
        "batches, so epoch 1 starts over from its first batch with the restored weights and trains on the 2 "
        "batch(es) it had trained before the save once more (the step count ends that much higher)"
    ) in warnings
    assert "resuming at epoch 1: epochs 0-0 are done and fit() passes over them" in caplog.text
    assert recorder.trained == [1, 2]  # epoch 1 again in full, the same epoch count as an uninterrupted run
    # The step counter goes on from the checkpoint's 6: epoch 1's first two batches count twice.
    assert records(directory) == [
        ("epoch=000-step=4", 0, 4, False, ["best"]),
        ("epoch=001-step=10", 1, 10, False, ["best"]),
        ("epoch=002-step=14", 2, 14, False, ["best", "last"]),
    ]
    assert int(portable_state(model)["lr/last_epoch"]) == 14  # the per-step schedule counts the same steps


def test_no_save_on_preemption_without_opt_in_or_for_errors_of_the_checkpointing(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    handlers: list[Any] = []

    class Handler(paddle.callbacks.Callback):
        def on_train_batch_begin(self, step: int, logs: Any = None) -> None:
            handlers.append(signal.getsignal(signal.SIGTERM))

    with pytest.raises(RuntimeError, match="data went bad"):
        fit(str(tmp_path / "off"), 3, Handler(), RaiseBefore(7, RuntimeError("data went bad")), save_on_preemption=False)
    assert [r[0] for r in records(str(tmp_path / "off"))] == ["epoch=000-step=4"]
    assert set(handlers) == {before}  # no SIGTERM handler of its own either

    with pytest.raises(CheckpointError, match="not ours to save"):
        fit(str(tmp_path / "own"), 3, RaiseBefore(7, CheckpointError("not ours to save")))
    assert [r[0] for r in records(str(tmp_path / "own"))] == ["epoch=000-step=4"]

    with pytest.raises(RuntimeError):  # before any batch: nothing trained, nothing to save
        fit(str(tmp_path / "early"), 3, RaiseBefore(1, RuntimeError("at once")))
    assert records(str(tmp_path / "early")) == []


def test_sigterm_with_a_handler_of_the_users_saves_then_runs_that_handler(tmp_path):
    calls: list[int] = []
    seen: list[Any] = []

    def users_handler(signum: int, frame: Any) -> None:
        calls.append(signum)  # returns: training goes on

    class Handler(paddle.callbacks.Callback):
        def on_train_batch_begin(self, step: int, logs: Any = None) -> None:
            seen.append(signal.getsignal(signal.SIGTERM))

    original = signal.signal(signal.SIGTERM, users_handler)
    try:
        callback, lasts, recorder, _ = fit(str(tmp_path), 3, Handler(), SigtermAt(6))
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, original)

    assert calls == [signal.SIGTERM]
    assert after is users_handler
    # The callback's own handler until the save; the user's handler returned and fit() stopped there:
    # no batch began after the save, and epoch 1 ended after its second batch.
    assert callback.session.watch is not None and seen == [callback.session.watch._handle] * 6
    assert [entry[:4] for entry in lasts.seen] == [
        ("epoch=000-step=4", 4, False, ["best", "last"]),
        ("preempted-epoch=001-step=6", 6, True, ["last", "preempted"]),
    ]
    assert recorder.trained == [0, 1]
    assert callback.session.preempted
    assert records(str(tmp_path))[-1] == ("preempted-epoch=001-step=6", 1, 6, True, ["last", "preempted"])


def test_sigterm_after_a_fit_that_died_unseen_takes_its_previous_course(tmp_path):
    """An error in another callback's epoch end ends fit() where no hook of ours runs; a SIGTERM after it is
    not held for a fit that is gone: the handler from before that fit gets it, and the directory is released."""
    calls: list[int] = []

    class FailAtEpochEnd(paddle.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch == 1:  # epoch 0 was saved as epoch 1 began
                raise RuntimeError("broken callback")

    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with pytest.raises(RuntimeError, match="broken callback"):
            fit(str(tmp_path), 3, FailAtEpochEnd())
        assert calls == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not None and "checkpoint_hooks" not in repr(
            signal.getsignal(signal.SIGTERM)
        )
    finally:
        signal.signal(signal.SIGTERM, original)
    # Released: another callback's fit resumes from the epoch saved before the failure.
    callback, _, recorder, _ = fit(str(tmp_path), 3)
    assert callback.resumed_from is not None and callback.resumed_from.name == "epoch=000-step=4"
    assert recorder.trained == [1, 2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    # Worker processes left behind would hold the output pipes open past the timeout.
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "tests.paddle.run_preempt", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


class Capture(paddle.callbacks.Callback):
    """The network's parameters and the schedule's step once `batches` batches and all their hooks ran."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.batches = batches
        self.seen = 0
        self.params: dict[str, np.ndarray] = {}
        self.lr_step = -1

    def on_train_batch_begin(self, step: int, logs: Any = None) -> None:
        if self.seen == self.batches:
            self.params = {k: np.array(v.numpy()) for k, v in self.model.network.state_dict().items()}
            self.lr_step = self.model._optimizer._learning_rate.last_epoch
        self.seen += 1


def test_sigterm_saves_a_preempted_mid_epoch_state_and_the_rerun_resumes_from_it(tmp_path):
    directory, out = str(tmp_path / "ck"), str(tmp_path / "out")
    # Loading in worker processes: they are stopped too, not left behind by the signal.
    killed = run_script("--dir", directory, "--out", out, "--sigterm-at", "6", "--workers", "2")
    assert killed.returncode == -signal.SIGTERM, killed.stderr[-3000:]
    assert "SIGTERM received; saving a training state to resume from before the process ends" in killed.stderr
    assert not os.path.exists(out + ".json")  # the process ended inside fit()
    assert records(directory) == [
        ("epoch=000-step=4", 0, 4, False, ["best"]),
        ("preempted-epoch=001-step=6", 1, 6, True, ["last", "preempted"]),
    ]
    checkpoints = CheckpointDirectory(directory)
    preempted = checkpoints.load().by_name("preempted-epoch=001-step=6")
    assert checkpoints.verify_record(preempted) == []

    # It holds the state after batch 6 and every hook of it (hapi's LRScheduler steps after the callback).
    capture = Capture(6)
    fit(str(tmp_path / "reference"), 2, capture)
    prefix = os.path.join(directory, "preempted-epoch=001-step=6")
    saved = paddle.load(prefix + ".pdparams")
    saved.pop("StructuredToParameterName@@", None)
    assert sorted(saved) == sorted(capture.params)
    for key, value in capture.params.items():
        assert np.array_equal(np.asarray(saved[key]), value), key
    assert paddle.load(prefix + ".pdopt")["LR_Scheduler"]["last_epoch"] == capture.lr_step == 6

    resumed = run_script("--dir", directory, "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1 starts over from its first batch" in resumed.stderr
    with open(out + ".json", encoding="utf-8") as f:
        info = json.load(f)
    assert info["resumed_from"] == "preempted-epoch=001-step=6"
    assert info["trained"] == [1, 2, 3]  # fit(epochs=4) ended after epoch 3, as uninterrupted
    assert records(directory) == [
        ("epoch=000-step=4", 0, 4, False, ["best"]),
        ("epoch=001-step=10", 1, 10, False, ["best"]),
        ("epoch=002-step=14", 2, 14, False, ["best"]),
        ("epoch=003-step=18", 3, 18, False, ["best", "last"]),
    ]
    with np.load(out + ".npz") as state:
        assert int(state["lr/last_epoch"]) == 18
    assert listing(directory) == files("epoch=000-step=4", "epoch=001-step=10", "epoch=002-step=14", "epoch=003-step=18")


def test_sigterm_on_one_of_two_ranks_stops_both_once_rank_0_saved(tmp_path):
    directory, out = str(tmp_path / "ck"), str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PADDLE_TRAINER_ID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
         os.path.join(ROOT, "tests", "paddle", "run_preempt.py"), "--dir", directory, "--out", out, "--epochs", "3",
         "--sigterm-at", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    logs = {name: (tmp_path / "logs" / name).read_text(errors="replace") for name in ("workerlog.0", "workerlog.1")}
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not [name for name in listing(str(tmp_path)) if name.startswith("out")]  # neither rank finished fit()
    # Only rank 0 got the signal; both agreed on stopping after batch 3 (2 batches an epoch on each rank).
    assert "SIGTERM received; saving a training state" in logs["workerlog.0"]
    assert "SIGTERM received (by this process or another); stopping once the writer saved" in logs["workerlog.1"]
    assert records(directory) == [
        ("epoch=000-step=2", 0, 2, False, ["best"]),
        ("preempted-epoch=001-step=3", 1, 3, True, ["last", "preempted"]),
    ]
    checkpoints = CheckpointDirectory(directory)
    assert checkpoints.verify_record(checkpoints.load().by_name("preempted-epoch=001-step=3")) == []
