"""Mistakes a user makes, each answered by one clear line: a misspelled monitor, a changed model, a finished run."""

from __future__ import annotations

import logging
import os
from typing import Any

import keras
import pytest

from checkpoint_hooks.core.errors import CheckpointError, MonitorError
from checkpoint_hooks.keras import BestCheckpoint
from tests.keras.helpers import Script, data, make_model


def fit(model: keras.Model, callbacks: list[Any], epochs: int) -> keras.callbacks.History:
    x, y = data()
    return model.fit(
        x, y, validation_data=(x[:8], y[:8]), batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks
    )


def checkpoints(dirpath: Any) -> list[str]:
    return sorted(name for name in os.listdir(dirpath) if name.endswith(".keras"))


@pytest.mark.parametrize(("monitor", "logged"), [("val_acc", "val_accuracy"), ("acc", "accuracy")])
def test_a_misspelled_monitor_stops_fit_at_the_first_epoch_end(tmp_path: Any, monitor: str, logged: str) -> None:
    model = make_model()
    model.compile(optimizer="adam", loss="mse", metrics=["accuracy"])
    ended: list[int] = []
    count = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ended.append(epoch))
    with pytest.raises(MonitorError) as caught:
        fit(model, [count, BestCheckpoint(monitor=monitor, dirpath=str(tmp_path))], epochs=3)
    message = str(caught.value)
    assert message.startswith(
        f"monitor={monitor!r} is not among the logged metrics (accuracy, loss, val_accuracy, val_loss)"
    ), message
    assert message.endswith(f"did you mean {logged!r}?"), message
    assert ended == [0]
    assert checkpoints(tmp_path) == []  # nothing named "val_acc=nan"
    # The directory was released: the corrected callback trains in it and ranks by the metric.
    callback = BestCheckpoint(monitor=logged, dirpath=str(tmp_path))
    fit(model, [callback], epochs=1)
    assert callback.best_model_path.endswith(".keras") and f"{logged}=" in callback.best_model_path


def test_a_changed_model_names_the_first_variable_whose_shape_changed(tmp_path: Any) -> None:
    first = BestCheckpoint(dirpath=str(tmp_path))
    fit(make_model(), [first], epochs=1)
    wider = make_model(units=16)
    with pytest.raises(CheckpointError) as caught:
        fit(wider, [BestCheckpoint(dirpath=str(tmp_path))], epochs=2)
    kernel = wider.layers[0].kernel.path
    assert str(caught.value) == (
        f"checkpoint {first.last_model_path} does not fit this model: {kernel} has shape (4, 8) in the checkpoint "
        "and (4, 16) in the model (the model changed since it was saved); resume with the model it was saved "
        "from, set resume='never' to start over, or give another dirpath"
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no 25 lines of Keras's below it
    # The way out the message names works in the same directory.
    history = fit(wider, [BestCheckpoint(dirpath=str(tmp_path), resume="never")], epochs=1)
    assert history.epoch == [0]


def test_a_finished_run_started_again_says_so_and_trains_nothing(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def callback() -> BestCheckpoint:
        return BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="f{epoch}")

    fit(make_model(), [Script([0.3, 0.5]), callback()], epochs=2)
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        again = fit(make_model(), [callback()], epochs=2)
        finished = [r.getMessage() for r in caplog.records if "already completed" in r.getMessage()]
        caplog.clear()
        longer = fit(make_model(), [Script([0, 0, 0.4]), callback()], epochs=3)
        continued = [r.getMessage() for r in caplog.records if "already completed" in r.getMessage()]
    assert again.epoch == []
    assert finished == [
        f"training already completed 2 epoch(s) in {tmp_path}; nothing is left to train. The best checkpoint is "
        f"{tmp_path / 'f1.keras'}. Ask for more epochs, or set resume='never' or another dirpath to train again"
    ]
    assert longer.epoch == [2] and continued == []  # epochs left to train: a resume, not a finished run


def test_a_validation_monitor_is_not_refused_in_an_epoch_without_validation(tmp_path: Any) -> None:
    callback = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="v{epoch}")
    x, y = data()
    with pytest.warns(UserWarning, match="Validation did not run this epoch"):
        make_model().fit(x, y, validation_data=(x[:8], y[:8]), validation_freq=2, epochs=2, verbose=0, callbacks=[callback])
    assert callback.best_model_path == str(tmp_path / "v2.keras")


def test_keras_global_seed_generator_is_restored_on_resume(tmp_path: Any) -> None:
    first, second = make_model(), make_model()  # make_model reseeds Keras: both are built before any draw
    keras.random.uniform((1,))  # an unseeded random op moves Keras's global SeedGenerator
    fit(first, [BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path))], epochs=1)
    after_save = float(keras.random.uniform((1,))[0])
    keras.random.uniform((5,))  # the global generator moves on
    fit(second, [BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path))], epochs=1)  # resumes: nothing left
    assert float(keras.random.uniform((1,))[0]) == after_save
