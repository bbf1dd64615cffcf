"""async_save through real Keras fits: the state copied at the epoch end, the files written in the background."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from typing import Any

import keras
import pytest

from checkpoint_hooks.core import SaveError
from checkpoint_hooks.keras import BestCheckpoint
from checkpoint_hooks.keras import snapshot as keras_snapshot
from tests.index import read_index
from tests.keras.helpers import FailAt, Script, Snapshot, data, listing, make_model, saved_state, weights_equal
from tests.spies import Publishes, TakenArrays, verifies

VAL = [0.5, 0.3, 0.4, 0.2, 0.6, 0.25]  # scripted val_loss per epoch: the retention outcome is exact


def fit(model: keras.Model, callbacks: list[Any], epochs: int) -> keras.callbacks.History:
    x, y = data()
    return model.fit(x, y, validation_data=(x[:8], y[:8]), batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)


def records(dirpath: Any) -> list[tuple[str, list[str], int, int]]:
    return [(r["name"], sorted(r["tags"]), r["epoch"], r["step"]) for r in read_index(dirpath)["records"]]


def callback(dirpath: Any, **options: Any) -> BestCheckpoint:
    options.setdefault("filename", "e{epoch}")
    return BestCheckpoint(monitor="val_loss", dirpath=str(dirpath), top_k=2, snapshots=3, **options)


def test_async_fit_keeps_what_a_sync_fit_keeps(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Publishes(monkeypatch)
    sync = callback(tmp_path / "sync")
    fit(make_model(), [Script(VAL), sync], epochs=6)
    assert spy.in_worker() == [False] * 6
    spy.calls.clear()
    ours = callback(tmp_path / "async", async_save=True)
    assert ours.policy is not None and ours.policy.async_save
    bests = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(ours.best))
    seen: list[Any] = []
    fit(make_model(), [Script(VAL), ours, bests], epochs=6)

    # Every save's tail ran in the worker; the fit's end waited for the last one.
    assert spy.in_worker() == [True] * 6
    assert listing(str(tmp_path / "async")) == listing(str(tmp_path / "sync"))
    assert records(tmp_path / "async") == records(tmp_path / "sync")
    verifies(tmp_path / "async")
    # `best` follows each epoch's save at once, before its commit.
    assert seen == [0.5, 0.3, 0.3, 0.2, 0.2, 0.2] and ours.best == sync.best == 0.2
    assert os.path.basename(ours.best_model_path) == os.path.basename(sync.best_model_path) == "e4.keras"
    assert os.path.basename(ours.last_model_path) == "e6.keras"
    assert saved_state(ours.last_model_path)["epoch"] == 5
    # The state member leaves the file a plain .keras model.
    assert keras.saving.load_model(ours.last_model_path).optimizer.iterations.numpy() == 24


def test_resume_after_an_async_fit(tmp_path: Any) -> None:
    states = Snapshot()
    fit(make_model(), [Script(VAL), callback(tmp_path, async_save=True), states], epochs=3)
    model = make_model(seed=1)
    start: list[Any] = []
    probe = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: start.append((model.get_weights(), int(model.optimizer.iterations.numpy())))
    )
    resumed = callback(tmp_path, async_save=True)
    history = fit(model, [Script(VAL), resumed, probe], epochs=6)

    assert history.epoch == [3, 4, 5]
    assert weights_equal(start[0][0], states.weights[2]) and start[0][1] == 12
    assert [name for name, *_ in records(tmp_path)] == ["e3", "e4", "e6"]  # e3, e6 snapshots; e4, e6 the best
    assert resumed.best == 0.2
    verifies(tmp_path)


def test_a_background_failure_of_the_last_save_raises_at_the_end_of_fit(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Publishes(monkeypatch, fail_on="e3")
    with pytest.raises(SaveError, match=r"could not save e3\.keras .*No space left on device"):
        fit(make_model(), [Script(VAL), callback(tmp_path, async_save=True)], epochs=3)

    assert [worker for worker, (_t, files) in zip(spy.in_worker(), spy.calls) if files[0].startswith("e3")] == [True]
    # Nothing of the failed save is visible; the earlier ones are committed and intact.
    assert [name for name, *_ in records(tmp_path)] == ["e1", "e2"]
    assert not [name for name in listing(str(tmp_path)) if name.startswith(("e3", ".checkpoint_hooks-staging"))]
    verifies(tmp_path)
    # The fit released the directory: the next one resumes after epoch 2.
    spy.fail_on = None
    history = fit(make_model(), [Script(VAL), callback(tmp_path, async_save=True)], epochs=3)
    assert history.epoch == [2]


def test_a_background_failure_raises_at_the_next_epoch_end(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    Publishes(monkeypatch, fail_on="e2")
    trained: list[int] = []
    probe = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: trained.append(epoch))
    with pytest.raises(SaveError, match=r"could not save e2\.keras"):
        fit(make_model(), [Script(VAL), probe, callback(tmp_path, async_save=True)], epochs=5)

    # Epoch 2 is saved (in the background) while epoch 3 trains; epoch 3's end finds the failure.
    assert trained == [0, 1, 2]
    assert [name for name, *_ in records(tmp_path)] == ["e1"]
    verifies(tmp_path)


def test_a_background_failure_only_warns_with_on_save_error_warn(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    Publishes(monkeypatch, fail_on="e2")
    ours = callback(tmp_path, async_save=True, on_save_error="warn")
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        history = fit(make_model(), [Script(VAL), ours], epochs=4)

    assert history.epoch == [0, 1, 2, 3]
    assert "could not save e2.keras" in caplog.text and "training goes on" in caplog.text
    assert [name for name, *_ in records(tmp_path)] == ["e3", "e4"]  # e1 left the top 2 when e4 came
    assert os.path.basename(ours.last_model_path) == "e4.keras"
    assert ours.best == 0.2
    verifies(tmp_path)


def test_a_failing_step_waits_for_the_save_in_flight_then_saves_a_preempted_state(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Publishes(monkeypatch, delay=0.3)  # epoch 2's save is still in flight when step 10 fails
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), FailAt(10), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True)
    ours = BestCheckpoint(monitor="loss", dirpath=str(tmp_path), filename="e{epoch}", top_k=-1, async_save=True)
    with pytest.raises(RuntimeError, match="step 10 failed"):
        fit(model, [ours], epochs=4)

    # Step 10 failed before its update: the state is that of step 9, inside epoch 3.
    assert [(name, epoch, step) for name, _tags, epoch, step in records(tmp_path)] == [
        ("e1", 0, 4), ("e2", 1, 8), ("preempted-epoch=003-step=9", 2, 9)
    ]
    assert spy.in_worker() == [True, True, False]  # the save on preemption ran in the foreground
    verifies(tmp_path)
    with open(tmp_path / ".checkpoint_hooks.lock", "rb") as f:  # released: another fit can take it
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@pytest.mark.parametrize("arrays", ["new", "kept from the save before"])
def test_async_files_hold_the_state_of_their_epoch_while_the_next_one_trains(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, arrays: str
) -> None:
    """Only a copy of the state is taken at the epoch end; the worker writes each file well after it."""
    if arrays != "new":
        monkeypatch.setattr(keras_snapshot, "REUSE_MIN_BYTES", 0)  # the toy's variables are small
    real = keras_snapshot.Snapshot.write
    threads: list[str] = []

    def late_write(snapshot: keras_snapshot.Snapshot, path: str) -> None:
        threads.append(threading.current_thread().name)
        time.sleep(0.3)
        real(snapshot, path)

    monkeypatch.setattr(keras_snapshot.Snapshot, "write", late_write)
    states = Snapshot()
    ours = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="e{epoch}", top_k=-1, async_save=True)
    fit(make_model(), [Script(VAL), ours, states], epochs=4)

    assert len(threads) == 4 and all(name.startswith("checkpoint_hooks-save") for name in threads)
    assert [name for name, *_ in records(tmp_path)] == ["e1", "e2", "e3", "e4"]
    for epoch in range(4):
        path = str(tmp_path / f"e{epoch + 1}.keras")
        loaded = keras.saving.load_model(path)
        assert weights_equal(loaded.get_weights(), states.weights[epoch]), path
        assert int(loaded.optimizer.iterations.numpy()) == 4 * (epoch + 1)
        assert saved_state(path)["epoch"] == epoch
    verifies(tmp_path)


def test_background_saves_copy_into_the_arrays_of_the_save_before(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = TakenArrays(monkeypatch)
    monkeypatch.setattr(keras_snapshot, "REUSE_MIN_BYTES", 0)
    ours = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="e{epoch}", top_k=-1, async_save=True)
    fit(make_model(), [Script(VAL), ours], epochs=4)
    saves = taken.by_save(4)
    assert len(saves[0]) == len(taken.arrays) // 4 and saves[1] == saves[2] == saves[3] == saves[0]
    assert ours._host_buffers._free == {}  # let go at the end of fit
    verifies(tmp_path)


def test_async_weights_files_are_written_in_the_worker(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Publishes(monkeypatch)
    states = Snapshot()
    ours = BestCheckpoint(
        monitor="val_loss", dirpath=str(tmp_path), filename="e{epoch}", format="weights", last=False, async_save=True
    )
    fit(make_model(), [Script(VAL), ours, states], epochs=4)

    assert spy.in_worker() == [True] * 3  # epochs 1, 2 and 4 are new bests
    assert [name for name, *_ in records(tmp_path)] == ["e4"]
    model = make_model(seed=1)
    model.load_weights(str(tmp_path / "e4.weights.h5"))
    assert weights_equal(model.get_weights(), states.weights[3])
    verifies(tmp_path)
