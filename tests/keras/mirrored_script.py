"""MirroredStrategy over 2 logical CPUs (configured before TensorFlow starts): save, then resume in the scope.

    python mirrored_script.py DIR OUT.json

Prints nothing useful; writes what test_distributed.py checks to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from checkpoint_hooks.keras import BestCheckpoint  # noqa: E402


def main() -> None:
    dirpath, out = sys.argv[1], sys.argv[2]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(3)
    x = rng.random((32, 4), dtype=np.float32)
    y = x.sum(axis=1, keepdims=True).astype("float32")

    def build() -> keras.Model:
        with strategy.scope():
            model = keras.Sequential(
                [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
            )
            model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return model

    report: dict[str, Any] = {"replicas": strategy.num_replicas_in_sync}
    keras.utils.set_random_seed(0)
    model = build()
    first = BestCheckpoint(monitor="val_loss", dirpath=dirpath, filename="m{epoch}", top_k=1)
    history = model.fit(
        x, y, validation_data=(x, y), batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[first]
    )
    report.update(
        first_epochs=history.epoch,
        writer=first.engine.is_writer if first.engine else None,
        strategy=type(model.distribute_strategy).__name__,
        files_after_first=sorted(os.listdir(dirpath)),
        weights_after_first=[w.tolist() for w in model.get_weights()],
        iterations_after_first=int(model.optimizer.iterations.numpy()),
    )

    # A fresh model and callback in the same scope: the optimizer is built inside it before loading.
    keras.utils.set_random_seed(1)
    again = build()
    second = BestCheckpoint(monitor="val_loss", dirpath=dirpath, filename="m{epoch}", top_k=1)
    seen: dict[str, Any] = {}

    def begin(logs: Any) -> None:
        seen["weights"] = [w.tolist() for w in again.get_weights()]
        seen["iterations"] = int(again.optimizer.iterations.numpy())

    probe = keras.callbacks.LambdaCallback(on_train_begin=begin)
    history = again.fit(
        x, y, validation_data=(x, y), batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[second, probe]
    )
    report.update(
        second_epochs=history.epoch,
        weights_at_resume=seen["weights"],
        iterations_at_resume=seen["iterations"],
        files_after_second=sorted(os.listdir(dirpath)),
        staging_left=[n for n in os.listdir(dirpath) if n.startswith(".staging-")],
    )
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
