"""Helpers of the Keras adapter tests: tiny data, a tiny model, a scripted monitor, weight snapshots."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((32, 4), dtype=np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype=np.float32)).astype("float32")
    return x, y


def make_model(seed: int = 0, dropout: bool = False, units: int = 8) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.Input((4,)), keras.layers.Dense(units, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(0.25))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return model


class Script(keras.callbacks.Callback):
    """Replaces the logged value of `key` by a scripted one per epoch, so retention outcomes are exact.

    Placed before the checkpoint callback: Keras hands every callback the same logs dict.
    """

    def __init__(self, values: Sequence[float], key: str = "val_loss") -> None:
        super().__init__()
        self.values = list(values)
        self.key = key

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        assert logs is not None
        logs[self.key] = self.values[epoch]


class Snapshot(keras.callbacks.Callback):
    """Copies the weights at every epoch end (placed after the checkpoint callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[int, list[np.ndarray]] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.weights[epoch] = [np.array(w) for w in self.model.get_weights()]


def weights_equal(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def listing(path: str) -> list[str]:
    """Every file below `path`, relative, sorted."""
    found = []
    for base, _dirs, files in os.walk(path):
        for name in files:
            found.append(os.path.relpath(os.path.join(base, name), path))
    return sorted(found)


def saved_state(path: str) -> dict[str, Any]:
    """The epoch, step and seed states a resumable .keras file carries in its zip archive."""
    with zipfile.ZipFile(path) as archive:
        state: dict[str, Any] = json.loads(archive.read("checkpoint_hooks.json"))
    return state


class FailAt(keras.layers.Layer):
    """Raises in the n-th training call (the model runs eagerly, so every step calls it)."""

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at = at
        self.calls = 0

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if training:
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError(f"step {self.at} failed")
        return inputs
