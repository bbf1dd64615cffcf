"""Policy mode inside an epoch: step and time triggers, SIGTERM with a handler of the user's, failing steps.

32 samples in batches of 8: 4 optimizer steps an epoch. Subprocess kills are in test_preemption.py.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import keras
import numpy as np
import pytest

from checkpoint_hooks import PolicyError
from checkpoint_hooks.core import CheckpointDirectory, Record
from checkpoint_hooks.core import engine as engine_module
from checkpoint_hooks.keras import BestCheckpoint
from tests.index import read_index
from tests.keras.helpers import FailAt, data, listing, make_model, saved_state


def fit(model: keras.Model, callbacks: list[Any], epochs: int, x: Any = None, **kwargs: Any) -> Any:
    if x is None:
        x, y = data()
        kwargs.update(y=y, batch_size=8)
    return model.fit(x, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks, **kwargs)


def records(dirpath: Any) -> dict[str, Record]:
    return {r["name"]: Record.from_json(r) for r in read_index(dirpath)["records"]}


def summary(dirpath: Any) -> dict[str, tuple[list[str], int, int, bool]]:
    return {name: (sorted(r.tags), r.epoch, r.step, r.mid_epoch) for name, r in records(dirpath).items()}


def step_of(model: keras.Model) -> int:
    return int(model.optimizer.iterations.numpy())


class AtStep(keras.callbacks.Callback):
    """Runs `action` at the batch end where the optimizer reaches `step`."""

    def __init__(self, step: int, action: Callable[[], None]) -> None:
        super().__init__()
        self.step = step
        self.action = action

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if step_of(self.model) == self.step:
            self.action()


class LastProbe(keras.callbacks.Callback):
    """After every batch end (placed after the checkpoint callback): the rolling last, and the SIGTERM handler."""

    def __init__(self, checkpoint: BestCheckpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.lasts: dict[int, str] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self.handlers: dict[int, Any] = {}

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        path = self.checkpoint.last_model_path
        self.lasts[step_of(self.model)] = os.path.basename(path).removesuffix(".keras")
        if path and os.path.basename(path) not in self.states:
            state = saved_state(path)
            self.states[os.path.basename(path)] = {
                k: state.get(k) for k in ("epoch", "step", "mid_epoch", "epoch_step")
            }
        self.handlers[step_of(self.model)] = signal.getsignal(signal.SIGTERM)


def test_every_n_steps_saves_mid_epoch_training_states(tmp_path: Any) -> None:
    checkpoint = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}", every_n_steps=3)
    probe = LastProbe(checkpoint)
    model = make_model()
    fit(model, [checkpoint, probe], epochs=3)
    third, sixth, ninth = "last-epoch=001-step=3", "last-epoch=002-step=6", "last-epoch=003-step=9"
    # Step 12 is a multiple of 3 but the last batch of epoch 3: that epoch's end saves the rolling last.
    assert probe.lasts == {
        1: "", 2: "", 3: third, 4: third, 5: "e1", 6: sixth, 7: sixth, 8: sixth, 9: ninth, 10: ninth, 11: ninth,
        12: ninth,
    }  # fmt: skip
    assert probe.states == {
        f"{third}.keras": {"epoch": 0, "step": 3, "mid_epoch": True, "epoch_step": 3},
        "e1.keras": {"epoch": 0, "step": 4, "mid_epoch": False, "epoch_step": None},
        f"{sixth}.keras": {"epoch": 1, "step": 6, "mid_epoch": True, "epoch_step": 2},
        f"{ninth}.keras": {"epoch": 2, "step": 9, "mid_epoch": True, "epoch_step": 1},
    }
    assert summary(tmp_path) == {"e3": (["best", "last"], 2, 12, False)}
    history = read_index(tmp_path)["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 4), (1, 8), (2, 12)]  # epoch ends only
    assert checkpoint._wrapper is None and not hasattr(model.train_function, "_checkpoint_hooks_original")


def test_integer_save_freq_means_every_n_steps_in_policy_mode(tmp_path: Any) -> None:
    checkpoint = BestCheckpoint(dirpath=str(tmp_path), monitor="loss", filename="e{epoch}", save_freq=2)
    assert checkpoint.policy is not None and checkpoint.policy.every_n_steps == 2
    probe = LastProbe(checkpoint)
    fit(make_model(), [checkpoint, probe], epochs=3)
    mid = sorted(name for name, state in probe.states.items() if state["mid_epoch"])
    # Steps 4, 8 and 12 end an epoch, whose end saves anyway.
    assert mid == ["last-epoch=001-step=2.keras", "last-epoch=002-step=6.keras", "last-epoch=003-step=10.keras"]
    assert summary(tmp_path) == {"e3": (["best", "last"], 2, 12, False)}
    with pytest.raises(PolicyError, match=r"give one of them. Received: save_freq=2, every_n_steps=3"):
        BestCheckpoint(dirpath=str(tmp_path), save_freq=2, every_n_steps=3)
    with pytest.raises(PolicyError, match=r"Received: save_freq=0"):
        BestCheckpoint(dirpath=str(tmp_path), save_freq=0)


def test_with_steps_per_execution_a_crossed_multiple_of_every_n_steps_saves(tmp_path: Any) -> None:
    checkpoint = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}", every_n_steps=2)
    probe = LastProbe(checkpoint)
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", steps_per_execution=3)
    fit(model, [checkpoint, probe], epochs=2)
    # Batch ends come after 3 steps and after the epoch's last one: 3, 4, 7, 8. Steps 2 and 6 are crossed, never hit.
    first, second = "last-epoch=001-step=3", "last-epoch=002-step=7"
    assert probe.lasts == {3: first, 4: first, 7: second, 8: second}
    assert probe.states == {
        f"{first}.keras": {"epoch": 0, "step": 3, "mid_epoch": True, "epoch_step": 3},
        f"{second}.keras": {"epoch": 1, "step": 7, "mid_epoch": True, "epoch_step": 3},
    }
    assert summary(tmp_path) == {"e2": (["best", "last"], 1, 8, False)}


class FakeClock:
    """The engine's clock: moved on by a callback, so a time trigger fires at known steps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.perf_counter = time.perf_counter
        self.time = time.time

    def monotonic(self) -> float:
        return self.now


def test_every_n_minutes_saves_when_that_much_time_passed_since_the_last_save(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(engine_module, "time", clock)

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            clock.now += 25.0  # each step takes 25 s

    checkpoint = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}", every_n_minutes=1)
    probe = LastProbe(checkpoint)
    fit(make_model(), [Tick(), checkpoint, probe], epochs=2)
    # 75 s after the start at step 3; epoch 1 ends at 100 s (a save); 175 s is 75 s after it, at step 7.
    assert probe.lasts == {
        1: "", 2: "", 3: "last-epoch=001-step=3", 4: "last-epoch=001-step=3", 5: "e1", 6: "e1",
        7: "last-epoch=002-step=7", 8: "last-epoch=002-step=7",
    }  # fmt: skip
    assert summary(tmp_path) == {"e2": (["best", "last"], 1, 8, False)}


def test_sigterm_saves_then_hands_the_signal_to_the_users_handler(tmp_path: Any) -> None:
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        checkpoint = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}")
        probe = LastProbe(checkpoint)
        sender = AtStep(6, lambda: os.kill(os.getpid(), signal.SIGTERM))
        model = make_model()
        history = fit(model, [sender, checkpoint, probe], epochs=4)
        assert received == [signal.SIGTERM]  # once, after the save
        assert signal.getsignal(signal.SIGTERM) is handler
        # During fit() the callback's own, until it saved at step 6.
        assert probe.handlers == {
            1: checkpoint._watch._handle,
            2: checkpoint._watch._handle,
            3: checkpoint._watch._handle,
            4: checkpoint._watch._handle,
            5: checkpoint._watch._handle,
            6: handler,
        }
    finally:
        signal.signal(signal.SIGTERM, previous)
    # The user's handler returned, so fit() stopped as stop_training stops it: after epoch 2's second batch.
    assert history.epoch == [0, 1]
    assert step_of(model) == 6
    assert checkpoint.preempted
    assert summary(tmp_path) == {
        "e1": (["best"], 0, 4, False),
        "preempted-epoch=002-step=6": (["last", "preempted"], 1, 6, True),
    }
    record = records(tmp_path)["preempted-epoch=002-step=6"]
    assert CheckpointDirectory(str(tmp_path)).verify_record(record) == []
    assert not hasattr(model.train_function, "_checkpoint_hooks_original")


def test_no_sigterm_handler_in_drop_in_mode_or_without_save_on_preemption(tmp_path: Any) -> None:
    before = signal.getsignal(signal.SIGTERM)
    dropin = BestCheckpoint(str(tmp_path / "d" / "m{epoch}.keras"))
    optout = BestCheckpoint(dirpath=str(tmp_path / "p"), monitor="loss", save_on_preemption=False)
    for checkpoint in (dropin, optout):
        probe = LastProbe(checkpoint)
        model = make_model()
        fit(model, [checkpoint, probe], epochs=1)
        assert set(probe.handlers.values()) == {before}
        assert not hasattr(model.train_function, "_checkpoint_hooks_original")
    assert sorted(os.listdir(tmp_path / "d")) == ["m1.keras"]


def failing_model(at: int | None) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), FailAt(at), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True)
    return model


def lock_is_free(dirpath: Any) -> bool:
    with open(os.path.join(dirpath, ".checkpoint_hooks.lock"), "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def test_an_exception_in_a_training_step_saves_a_preempted_state_first(tmp_path: Any) -> None:
    before = signal.getsignal(signal.SIGTERM)
    model = failing_model(at=7)
    checkpoint = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}")
    with pytest.raises(RuntimeError, match="step 7 failed"):
        fit(model, [checkpoint], epochs=4)
    # Step 7 failed before its update: the state is that of step 6, inside epoch 2.
    assert summary(tmp_path) == {
        "e1": (["best"], 0, 4, False),
        "preempted-epoch=002-step=6": (["last", "preempted"], 1, 6, True),
    }
    assert CheckpointDirectory(str(tmp_path)).verify_record(records(tmp_path)["preempted-epoch=002-step=6"]) == []
    # fit() ended without on_train_end, yet the handler, train_function and the directory lock are back.
    assert signal.getsignal(signal.SIGTERM) == before
    assert not hasattr(model.train_function, "_checkpoint_hooks_original")
    assert lock_is_free(tmp_path)

    resumed = failing_model(at=None)
    history = fit(resumed, [BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}")], epochs=4)
    assert history.epoch == [1, 2, 3]  # epoch 2 starts over
    assert step_of(resumed) == 6 + 3 * 4
    assert summary(tmp_path) == {"e4": (["best", "last"], 3, 18, False)}


def test_the_end_of_a_dataset_of_unknown_length_is_not_a_failure(tmp_path: Any) -> None:
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a tf.data pipeline of unknown length")
    import tensorflow as tf

    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(8)
    checkpoint = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}", every_n_steps=4)
    probe = LastProbe(checkpoint)
    model = make_model()
    fit(model, [checkpoint, probe], epochs=2, x=dataset)
    # The epoch length is unknown, so the last batch is not known either: step 4 saves mid-epoch. The step
    # that finds the data exhausted ends the epoch (Keras counts it: 5 steps an epoch) and saves nothing.
    assert probe.lasts == {
        1: "", 2: "", 3: "", 4: "last-epoch=001-step=4", 6: "e1", 7: "e1", 8: "last-epoch=002-step=8",
        9: "last-epoch=002-step=8",
    }  # fmt: skip
    assert summary(tmp_path) == {"e2": (["best", "last"], 1, 10, False)}
    assert not hasattr(model.train_function, "_checkpoint_hooks_original")


def test_a_fit_ended_by_an_exception_elsewhere_leaves_nothing_behind(tmp_path: Any) -> None:
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            raise ValueError("a callback failed")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        checkpoint = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}")
        model = make_model()
        with pytest.raises(ValueError, match="a callback failed"):
            fit(model, [checkpoint, Crash()], epochs=2)
        # Keras calls no callback when fit() fails outside a training step: the handler is still the callback's,
        assert signal.getsignal(signal.SIGTERM) == checkpoint._watch._handle
        # but it sees that fit() is over, puts the user's back and hands it the signal.
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
        assert not hasattr(model.train_function, "_checkpoint_hooks_original")
        assert lock_is_free(tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert summary(tmp_path) == {"e1": (["best", "last"], 0, 4, False)}
    assert listing(str(tmp_path)) == sorted(
        [".checkpoint_hooks.lock", "e1.keras", "e1.meta.json", "manifest.head", "manifest.json"]
    )
    assert np.isfinite(step_of(model))
