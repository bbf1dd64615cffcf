"""Drop-in mode: built from ModelCheckpoint's arguments only, BestCheckpoint is ModelCheckpoint.

Keras's own ModelCheckpoint tests run here with the class swapped, and our
own comparisons run both callbacks on identical fits and compare every file,
exception and warning.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import keras
import numpy as np
import pytest

from checkpoint_hooks.keras import BestCheckpoint
from tests.keras.helpers import data, listing, make_model, weights_equal

upstream = pytest.importorskip("keras.src.callbacks.model_checkpoint_test")


class _Counted(BestCheckpoint):
    """BestCheckpoint that remembers its instances, to prove the swap took place."""

    created: list[BestCheckpoint] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _Counted.created.append(self)


class TestKerasOwnModelCheckpointSuite(upstream.ModelCheckpointTest):  # type: ignore[name-defined,misc]
    """Keras's own ModelCheckpoint tests (this Keras version's), with `callbacks.ModelCheckpoint` = BestCheckpoint."""

    def setUp(self) -> None:
        super().setUp()
        self._original = upstream.callbacks
        swapped = {k: v for k, v in vars(self._original).items() if not k.startswith("__")}
        swapped["ModelCheckpoint"] = _Counted
        upstream.callbacks = types.SimpleNamespace(**swapped)
        _Counted.created.clear()

    def tearDown(self) -> None:
        upstream.callbacks = self._original
        created = list(_Counted.created)
        _Counted.created.clear()
        super().tearDown()
        assert len(created) >= 2, "the swapped class was not used"
        assert all(cb.policy is None for cb in created), "a ModelCheckpoint-only construction left drop-in mode"


def _load(path: str, template: keras.Model) -> list[np.ndarray]:
    if path.endswith(".weights.h5"):
        template.load_weights(path)
        return template.get_weights()
    return keras.models.load_model(path, compile=False).get_weights()


def _fit(callbacks: list[Any], epochs: int = 3) -> tuple[keras.callbacks.History, list[str]]:
    """One real fit with every callback attached; returns the history and the checkpoint warnings."""
    x, y = data()
    model = make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x,
            y,
            validation_data=(x[:8], y[:8]),
            batch_size=8,
            epochs=epochs,
            verbose=0,
            shuffle=False,
            callbacks=callbacks,
        )
    messages = [str(w.message) for w in caught if "ModelCheckpoint" in str(w.message) or "Can save" in str(w.message)]
    return history, messages


CASES = [
    ("{epoch:02d}-{val_loss:.4f}.keras", dict(monitor="val_loss", save_best_only=True)),
    ("w-{epoch}.weights.h5", dict(save_weights_only=True)),
    ("e{epoch}-b{batch}.keras", dict(save_freq=3)),
    ("e{epoch:02d}-b{batch:02d}.weights.h5", dict(save_freq=2, save_weights_only=True)),
    ("best.h5", dict(monitor="val_mae", mode="min", save_best_only=True)),
    ("fixed.keras", dict(monitor="val_loss", save_best_only=True, initial_value_threshold=1e9)),
    ("never.keras", dict(monitor="val_loss", save_best_only=True, initial_value_threshold=0.0)),
    ("{epoch}-{mae:.3f}-{val_mae:.3f}.keras", dict(monitor="val_mae", mode="max", verbose=1)),
    ("nope-{epoch}.keras", dict(monitor="val_nope", mode="min", save_best_only=True)),
]


def test_same_files_and_warnings_as_model_checkpoint(tmp_path: Any) -> None:
    # Both callbacks of every case watch the same fit, so each pair sees identical model states.
    callbacks = []
    for index, (template, kwargs) in enumerate(CASES):
        for cls in (keras.callbacks.ModelCheckpoint, BestCheckpoint):
            callbacks.append(cls(str(tmp_path / cls.__name__ / str(index) / template), **kwargs))
    history, messages = _fit(callbacks)
    assert history.epoch == [0, 1, 2]
    assert all(cb.policy is None for cb in callbacks if isinstance(cb, BestCheckpoint))
    for index, (template, _kwargs) in enumerate(CASES):
        theirs = listing(str(tmp_path / "ModelCheckpoint" / str(index)))
        ours = listing(str(tmp_path / "BestCheckpoint" / str(index)))
        assert ours == theirs, template
        if ours:
            newest = ours[-1]
            mine = _load(str(tmp_path / "BestCheckpoint" / str(index) / newest), make_model())
            assert weights_equal(mine, _load(str(tmp_path / "ModelCheckpoint" / str(index) / newest), make_model()))
    # 32 samples, batch 8: 4 batches an epoch; saving every 3 batches counts across epochs (ModelCheckpoint's rule).
    assert listing(str(tmp_path / "BestCheckpoint" / "2")) == [
        "e1-b3.keras",
        "e2-b2.keras",
        "e3-b1.keras",
        "e3-b4.keras",
    ]
    assert listing(str(tmp_path / "BestCheckpoint" / "6")) == []
    assert listing(str(tmp_path / "BestCheckpoint" / "8")) == ["nope-1.keras", "nope-2.keras", "nope-3.keras"]
    # Three epochs, two callbacks without their monitor: each warns every epoch, as ModelCheckpoint does.
    assert messages == ["Can save best model only with val_nope available."] * 6


def test_no_resume_and_no_pruning_in_drop_in_mode(tmp_path: Any) -> None:
    x, y = data()
    path = str(tmp_path / "m-{epoch}.keras")
    for _ in range(2):
        model = make_model()
        callback = BestCheckpoint(path, monitor="val_loss")
        history = model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[callback])
        assert history.epoch == [0, 1]
        assert model._initial_epoch is None
        assert callback.policy is None and callback.engine is None
    assert listing(str(tmp_path)) == ["m-1.keras", "m-2.keras"]


def test_best_is_kept_across_fits_like_model_checkpoint(tmp_path: Any) -> None:
    x, y = data()
    model = make_model()
    theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / "a.keras"), monitor="val_loss", save_best_only=True)
    ours = BestCheckpoint(str(tmp_path / "b.keras"), monitor="val_loss", save_best_only=True)
    model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[theirs, ours])
    assert ours.best == theirs.best is not None
    first = ours.best
    # A second fit keeps the best of the first (Keras never resets it); a worse value saves nothing.
    model.fit(x, y, validation_data=(x + 10, y), epochs=1, verbose=0, callbacks=[theirs, ours])
    assert ours.best == theirs.best == first


BAD_ARGUMENTS = [
    (("model.txt",), {}),
    (("model",), {}),
    (("model.keras",), {"save_weights_only": True}),
    (("model.h5",), {"save_weights_only": True}),
    (("model.keras",), {"save_freq": "batch"}),
    (("model.keras",), {"save_freq": 2.0}),
]


@pytest.mark.parametrize("args,kwargs", BAD_ARGUMENTS)
def test_same_construction_errors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(Exception) as theirs:
        keras.callbacks.ModelCheckpoint(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        BestCheckpoint(*args, **kwargs)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_unknown_mode_warns_with_model_checkpoint_wording() -> None:
    with pytest.warns(UserWarning) as theirs:
        keras.callbacks.ModelCheckpoint("m.keras", mode="bogus")
    with pytest.warns(UserWarning) as ours:
        callback = BestCheckpoint("m.keras", mode="bogus")
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert callback.mode == "auto"


@pytest.mark.parametrize(
    "template,kwargs",
    [
        ("m-{missing}.keras", {}),  # a placeholder no log provides
        ("m.keras", {"monitor": "val_custom"}),  # auto mode cannot tell this metric's direction
    ],
)
def test_same_errors_during_fit(tmp_path: Any, template: str, kwargs: dict[str, Any]) -> None:
    errors = []
    for cls in (keras.callbacks.ModelCheckpoint, BestCheckpoint):
        root = tmp_path / cls.__name__
        with pytest.raises(Exception) as caught:
            _fit([cls(str(root / template), **kwargs)], epochs=1)
        errors.append((type(caught.value), str(caught.value).replace(str(root), "ROOT")))
    assert errors[0] == errors[1]
