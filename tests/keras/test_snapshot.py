"""keras_snapshot: what model.save / save_weights would write, copied now and written later."""

from __future__ import annotations

import os
import zipfile
from typing import Any

import keras
import numpy as np
import pytest

from checkpoint_hooks.keras import snapshot as keras_snapshot
from tests.keras.helpers import data, make_model

H5 = "model.weights.h5"


def trained(epochs: int = 1) -> keras.Model:
    model = make_model()
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)
    return model


def train_on(model: keras.Model) -> None:
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)


def values(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v) for v in [*model.weights, *model.optimizer.variables]]


def members(path: Any) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_available_with_this_keras() -> None:
    assert keras_snapshot.available()


def test_a_keras_snapshot_writes_what_model_save_wrote_when_it_was_taken(tmp_path: Any) -> None:
    model = trained()
    model.save(tmp_path / "native.keras")
    before = values(model)
    snapshot = keras_snapshot.take(model)
    snapshot.members["extra.json"] = b"{}"
    train_on(model)  # the variables change in place before the file is written
    assert not all(np.array_equal(a, b) for a, b in zip(before, values(model), strict=True))
    snapshot.write(str(tmp_path / "ours.keras"))

    ours, native = members(tmp_path / "ours.keras"), members(tmp_path / "native.keras")
    assert list(ours) == [*native, "extra.json"] == ["metadata.json", "config.json", H5, "extra.json"]
    assert ours["config.json"] == native["config.json"]
    assert ours[H5] == native[H5]  # the same groups, attributes and datasets, byte for byte
    loaded = keras.saving.load_model(tmp_path / "ours.keras")
    assert all(np.array_equal(a, b) for a, b in zip(values(loaded), before, strict=True))
    assert loaded.get_compile_config() == model.get_compile_config()


def test_a_weights_snapshot_writes_the_bytes_of_save_weights(tmp_path: Any) -> None:
    model = trained()
    model.save_weights(tmp_path / "native.weights.h5")
    snapshot = keras_snapshot.take(model, archive=False)
    train_on(model)
    snapshot.write(str(tmp_path / "ours.weights.h5"))

    assert (tmp_path / "ours.weights.h5").read_bytes() == (tmp_path / "native.weights.h5").read_bytes()


def test_assets_of_a_layer_are_written_and_load_back(tmp_path: Any) -> None:
    lookup = keras.layers.StringLookup()
    lookup.adapt(["a", "b", "c", "c"])  # an adapted vocabulary is saved as an asset file
    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.ops.cast(lookup(inputs), "float32")))
    model.save(tmp_path / "native.keras")
    snapshot = keras_snapshot.take(model)
    assert snapshot.assets is not None and snapshot.assets.tmp_dir is not None
    folder = snapshot.assets.tmp_dir
    snapshot.write(str(tmp_path / "ours.keras"))

    assert sorted(members(tmp_path / "ours.keras")) == sorted(members(tmp_path / "native.keras"))
    assert any(name.startswith("assets/") for name in members(tmp_path / "ours.keras"))
    loaded = keras.saving.load_model(tmp_path / "ours.keras")
    assert loaded.layers[1].get_vocabulary() == lookup.get_vocabulary()
    assert not os.path.exists(folder)  # the assets' temporary folder is gone


def snapshot_with_assets() -> tuple[keras_snapshot.Snapshot, str]:
    """A snapshot of a model with an adapted vocabulary, and the temporary folder holding its asset."""
    lookup = keras.layers.StringLookup()
    lookup.adapt(["a"])
    inputs = keras.Input((1,), dtype="string")
    snapshot = keras_snapshot.take(keras.Model(inputs, lookup(inputs)))
    assert snapshot.assets is not None and snapshot.assets.tmp_dir is not None
    assert os.path.isdir(snapshot.assets.tmp_dir)
    return snapshot, snapshot.assets.tmp_dir


def test_a_failed_write_leaves_no_temporary_folder(tmp_path: Any) -> None:
    snapshot, folder = snapshot_with_assets()
    with pytest.raises(OSError):
        snapshot.write(str(tmp_path / "missing" / "x.keras"))
    assert not os.path.exists(folder)


def test_the_skip_sets_keras_rebuilds_at_every_save_are_kept_unchanged() -> None:
    import threading

    from keras.src.saving import saving_lib

    model = trained()
    keras_snapshot.take(model)
    kept = {t: saving_lib.get_attr_skipset(t) for t in ("Sequential", "Layer", "Optimizer", "Metric")}
    fresh: dict[str, Any] = {}

    def compute() -> None:  # Keras's state is per thread: a new thread computes every set anew
        fresh.update({t: saving_lib.get_attr_skipset(t) for t in kept})

    thread = threading.Thread(target=compute)
    thread.start()
    thread.join()
    assert kept == fresh and all(kept.values())
    # Found where Keras looks for them: a second lookup returns the same object.
    assert all(saving_lib.get_attr_skipset(t) is kept[t] for t in kept)


def test_a_snapshot_dropped_unwritten_removes_its_temporary_folder() -> None:
    import gc

    snapshot, folder = snapshot_with_assets()
    del snapshot
    gc.collect()
    assert not os.path.exists(folder)
