"""async_save through real Paddle fits: the state copied at the epoch end, the files written in the background."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np
import paddle
import pytest

from checkpoint_hooks.core import SaveError, SaveItem
from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.paddle import STATE_KEY, BestCheckpoint
from checkpoint_hooks.paddle.io import host_array, host_copy, save_files
from tests.paddle.toy import (
    VAL_OFFSETS,
    Recorder,
    Regression,
    listing,
    manifest_records,
    portable_state,
    regression_model,
)
from tests.spies import Publishes, TakenArrays, verifies


def fit(directory: str, epochs: int, *extra: Any, model: Any = None, **options: Any) -> tuple[BestCheckpoint, Recorder, Any]:
    model = model if model is not None else regression_model(0)
    eval_data = Regression(16, seed=1, offsets=VAL_OFFSETS)
    recorder = Recorder(eval_data)
    options.setdefault("monitor", "val_loss")
    options.setdefault("top_k", 2)
    callback = BestCheckpoint(dirpath=directory, **options)
    model.fit(Regression(), eval_data, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[callback, recorder, *extra])
    return callback, recorder, model


def test_async_fit_keeps_what_a_sync_fit_keeps(tmp_path, monkeypatch):
    spy = Publishes(monkeypatch)
    sync, _, _ = fit(str(tmp_path / "sync"), 6, snapshots=4)
    assert spy.threads == {"main"}
    spy.calls.clear()
    callback, recorder, _ = fit(str(tmp_path / "async"), 6, snapshots=4, async_save=True)

    # Every save's tail ran in the worker; the fit's end waited for the last one.
    assert spy.threads == {"worker"} and len(spy.calls) == 6
    assert recorder.trained == [0, 1, 2, 3, 4, 5]
    assert listing(str(tmp_path / "async")) == listing(str(tmp_path / "sync"))
    assert manifest_records(str(tmp_path / "async")) == manifest_records(str(tmp_path / "sync"))
    verifies(str(tmp_path / "async"))
    assert os.path.basename(callback.best_model_path) == os.path.basename(sync.best_model_path) != ""
    assert os.path.basename(callback.last_model_path) == os.path.basename(sync.last_model_path) != ""


def test_resume_after_an_async_fit_continues_bitwise(tmp_path):
    _, _, reference = fit(str(tmp_path / "ref"), 5)
    fit(str(tmp_path / "run"), 2, async_save=True)
    callback, recorder, model = fit(str(tmp_path / "run"), 5, model=regression_model(seed=7), async_save=True)

    assert callback.resumed_from is not None and callback.resumed_from.epoch == 1
    assert recorder.trained == [2, 3, 4]
    a, b = portable_state(model), portable_state(reference)
    assert sorted(a) == sorted(b)
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []
    assert manifest_records(str(tmp_path / "run")) == manifest_records(str(tmp_path / "ref"))


def test_a_background_failure_of_the_last_save_raises_at_the_end_of_fit(tmp_path, monkeypatch):
    directory = str(tmp_path / "ck")
    spy = Publishes(monkeypatch, fail_on="epoch=003")
    with pytest.raises(SaveError, match=r"could not save epoch=003-step=16\.pdparams .*No space left on device"):
        fit(directory, 4, monitor=None, top_k=-1, async_save=True)

    assert [thread.startswith("checkpoint_hooks-save") for thread, files in spy.calls if files[0].startswith("epoch=003")] == [True]
    # Nothing of the failed save is visible; the earlier ones are committed and intact.
    assert [r["epoch"] for r in manifest_records(directory)] == [0, 1, 2]
    assert not [name for name in listing(directory) if name.startswith(("epoch=003", ".checkpoint_hooks-staging"))]
    verifies(directory)
    # The fit released the directory: the next one resumes from epoch 2.
    spy.fail_on = None
    callback, recorder, _ = fit(directory, 4, monitor=None, top_k=-1, async_save=True)
    assert callback.resumed_from is not None and callback.resumed_from.epoch == 2
    assert recorder.trained == [3]


def test_a_background_failure_raises_at_the_next_save(tmp_path, monkeypatch):
    directory = str(tmp_path / "ck")
    Publishes(monkeypatch, fail_on="epoch=001")
    recorder = Recorder()
    with pytest.raises(SaveError, match=r"could not save epoch=001-step=8\.pdparams"):
        fit(directory, 5, recorder, monitor=None, top_k=-1, async_save=True)

    # Epoch 1 is saved (in the background) while epoch 2 trains; epoch 2's save finds the failure.
    assert recorder.trained == [0, 1, 2]
    assert [r["epoch"] for r in manifest_records(directory)] == [0]
    verifies(directory)


def test_a_background_failure_only_warns_with_on_save_error_warn(tmp_path, monkeypatch, caplog):
    directory = str(tmp_path / "ck")
    Publishes(monkeypatch, fail_on="epoch=001")
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        callback, recorder, _ = fit(directory, 4, monitor=None, top_k=-1, async_save=True, on_save_error="warn")

    assert recorder.trained == [0, 1, 2, 3]
    assert "could not save epoch=001-step=8.pdparams" in caplog.text and "training goes on" in caplog.text
    assert [r["epoch"] for r in manifest_records(directory)] == [0, 2, 3]
    assert os.path.basename(callback.last_model_path) == "epoch=003-step=16.pdparams"
    verifies(directory)


def test_an_exception_waits_for_the_save_in_flight_then_saves_a_preempted_state(tmp_path, monkeypatch):
    directory = str(tmp_path / "ck")
    spy = Publishes(monkeypatch, delay=0.3)  # the epoch 1 save is still in flight when epoch 2 fails

    class FailIn(paddle.callbacks.Callback):
        """Raises in the second batch of epoch 2."""

        epoch = -1

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_train_batch_begin(self, step: int, logs: Any = None) -> None:
            if self.epoch == 2 and step == 1:
                raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        fit(directory, 5, FailIn(), monitor=None, top_k=-1, async_save=True)

    records = manifest_records(directory)
    assert [(r["epoch"], r["tags"]) for r in records[:2]] == [(0, ["best"]), (1, ["best"])]
    assert records[-1]["name"] == "preempted-epoch=002-step=9" and records[-1]["tags"] == ["last", "preempted"]
    assert spy.calls[-1][0] == "MainThread"  # the save on preemption ran in the foreground
    verifies(directory)
    # Released: a new fit resumes from the preempted state.
    callback, _, _ = fit(directory, 5, monitor=None, top_k=-1)
    assert callback.resumed_from is not None and callback.resumed_from.name == "preempted-epoch=002-step=9"


@pytest.mark.parametrize("arrays", ["new", "kept from the save before"])
def test_async_files_hold_the_state_of_their_epoch_while_the_next_one_trains(tmp_path, monkeypatch, arrays):
    """The worker writes each save's files well after the next epoch started changing the tensors in place."""
    import checkpoint_hooks.paddle.io as adapter

    if arrays != "new":
        monkeypatch.setattr(adapter, "REUSE_MIN_BYTES", 0)  # the toy's tensors are small

    real = adapter.save_files
    threads = []

    def late_save_files(*args: Any) -> None:
        threads.append(threading.current_thread().name)
        time.sleep(0.2)
        real(*args)

    monkeypatch.setattr(adapter, "save_files", late_save_files)
    fit(str(tmp_path / "sync"), 4, monitor=None, top_k=-1)
    assert threads == ["MainThread"] * 4
    threads.clear()
    _, recorder, _ = fit(str(tmp_path / "async"), 4, monitor=None, top_k=-1, async_save=True)

    assert recorder.trained == [0, 1, 2, 3] and len(threads) == 4
    assert all(name.startswith("checkpoint_hooks-save") for name in threads)
    names = [r["name"] for r in manifest_records(str(tmp_path / "sync"))]
    assert names == [r["name"] for r in manifest_records(str(tmp_path / "async"))] and len(names) == 4
    for name in names:
        for suffix in (".pdparams", ".pdopt"):
            sync = paddle.load(str(tmp_path / "sync" / (name + suffix)), return_numpy=True)
            background = paddle.load(str(tmp_path / "async" / (name + suffix)), return_numpy=True)
            sync_arrays = [v for k, v in sync.items() if isinstance(v, np.ndarray)]
            background_arrays = [v for k, v in background.items() if isinstance(v, np.ndarray)]
            assert len(sync_arrays) == len(background_arrays) > 0
            assert all(np.array_equal(a, b) for a, b in zip(sync_arrays, background_arrays, strict=True)), name + suffix
            if suffix == ".pdopt":
                assert sync[STATE_KEY]["step"] == background[STATE_KEY]["step"]
    verifies(str(tmp_path / "async"))


def test_background_saves_copy_into_the_arrays_of_the_save_before(tmp_path, monkeypatch):
    import checkpoint_hooks.paddle.io as adapter

    taken = TakenArrays(monkeypatch)
    monkeypatch.setattr(adapter, "REUSE_MIN_BYTES", 0)  # the toy's tensors are small: kept all the same
    callback, _, _ = fit(str(tmp_path / "ck"), 4, monitor=None, top_k=-1, async_save=True)
    saves = taken.by_save(4)
    assert len(saves[0]) == len(taken.arrays) // 4 and saves[1] == saves[2] == saves[3] == saves[0]
    assert callback._paddle.buffers._free == {}  # let go at the end of fit


def test_small_tensors_are_copied_afresh_and_large_ones_into_kept_arrays():
    buffers: HostBuffers[np.ndarray] = HostBuffers(np.empty)
    small, large = paddle.ones([8, 8]), paddle.ones([1024, 512])  # 256 B and 2 MiB of float32
    first, second = host_array(large, buffers), host_array(large, buffers)
    assert second is not first  # both in use by this save
    host_array(small, buffers)
    buffers.recycle()
    with paddle.no_grad():
        large.set_value(large * 3.0)
    again = host_array(large, buffers)
    assert again is first or again is second  # an array of the save before
    assert np.array_equal(again, large.numpy()) and float(again[0, 0]) == 3.0
    assert list(buffers._free) == [((1024, 512), np.dtype("float32"))]  # nothing of the small tensor was kept


@pytest.mark.parametrize("buffers", ["new arrays", "arrays of an earlier save"])
@pytest.mark.parametrize("kind", ["network", "optimizer", "nested"])
def test_a_host_copy_pickles_to_the_bytes_paddle_save_writes(tmp_path, monkeypatch, kind, buffers):
    import checkpoint_hooks.paddle.io as adapter

    monkeypatch.setattr(adapter, "REUSE_MIN_BYTES", 0)
    model = regression_model(0)
    model.fit(Regression(), batch_size=8, epochs=1, verbose=0, shuffle=False)
    network, optimizer = model.network, model._optimizer
    state: Any = {
        "network": network.state_dict(),
        "optimizer": {**optimizer.state_dict(), STATE_KEY: {"epoch": 0, "names": {"a": "b"}, "rng": b"\x00"}},
        # not a state dict for paddle.save (tensors below the first level): serialized at once
        "nested": {"layers": {"w": network.parameters()[0]}, "step": 3},
    }[kind]
    paddle.save(state, str(tmp_path / "paddle.save"))
    pool = None
    if buffers != "new arrays":
        pool = HostBuffers(np.empty)
        host_copy(regression_model(1).network.state_dict(), pool)  # other values, the same shapes
        pool.recycle()
    copy = host_copy(state, pool)
    with paddle.no_grad():  # training goes on: the copy keeps the values it was taken with
        for parameter in network.parameters():
            parameter.set_value(parameter + 1.0)
    if kind == "optimizer":
        state[STATE_KEY]["epoch"] = 1  # and so do the plain dicts beside the tensors
    item = SaveItem(name="x", format="weights", roles=frozenset(), filename="x.pdparams")
    save_files(item, {".pdparams": copy}, str(tmp_path / "ours.pdparams"))
    assert (tmp_path / "ours.pdparams").read_bytes() == (tmp_path / "paddle.save").read_bytes()
