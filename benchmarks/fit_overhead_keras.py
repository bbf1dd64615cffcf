"""Fit overhead, Keras 3: BestCheckpoint vs keras.callbacks.ModelCheckpoint vs no checkpointing.

    python benchmarks/fit_overhead_keras.py            # 20 epochs, 7 fits per variant
    python benchmarks/fit_overhead_keras.py --quick    # 3 epochs, 2 fits per variant

A small MLP (32-256-256-1, about 75k parameters, Adam, TensorFlow backend) on 2,048 random
samples, 32 steps per epoch, validation every epoch, a checkpoint callback that saves every epoch:

* none:   no callback
* native: ModelCheckpoint("<dir>/epoch{epoch:02d}.keras", save_best_only=False)
* ours:   BestCheckpoint(monitor="val_loss", top_k=3, snapshots=5, last=True)  (.keras files)
* ours_async: the same with async_save=True (the files are written at the epoch end; hashing, fsync,
  commit and pruning run in the background)

Each fit gets a fresh folder; the variants are interleaved fit by fit (a shuffled order each round) and os.sync() runs untimed
between fits. Reported: wall time of `model.fit` per variant, ours/native (target <= 1.00), the
time spent inside the checkpoint callback's hooks, and the files each variant leaves. When
`checkpoint_hooks.keras` does not import, the JSON says so and nothing is measured.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from typing import Any

import _common as common

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2560, 32), dtype=np.float32)
    y = (np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * rng.standard_normal((2560, 1))).astype(np.float32)
    return x[:2048], y[:2048], x[2048:], y[2048:]


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs per fit (default 20, --quick 3)")
    args = p.parse_args()
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 20)
    repetitions = common.reps(args, default=7)
    header: dict[str, Any] = {
        "benchmark": "fit_overhead_keras",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "epochs": epochs,
        "repetitions": repetitions,
        "machine": common.machine(),
    }
    try:
        from checkpoint_hooks.keras import BestCheckpoint
    except Exception as exc:  # the adapter may not be there yet: say so instead of failing
        common.emit({**header, "skipped": f"checkpoint_hooks.keras does not import: {type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc().splitlines()[-3:]})
        return

    warnings.filterwarnings("ignore")
    logging.getLogger("checkpoint_hooks").setLevel(logging.ERROR)
    x, y, xv, yv = data()
    callback_time: dict[str, list[float]] = {"native": [], "ours": [], "ours_async": []}
    files: dict[str, list[str]] = {}

    with common.workdir(args, "fit-keras") as root:
        counter = iter(range(10**9))

        def fit(variant: str) -> float:
            folder = common.fresh(os.path.join(root, f"{variant}-{next(counter)}"))
            timer = common.HookTimer()
            callbacks: list[Any] = []
            if variant == "native":
                cb = keras.callbacks.ModelCheckpoint(os.path.join(folder, "epoch{epoch:02d}.keras"), save_best_only=False)
                callbacks.append(timer.attach(cb, common.hook_names(cb)))
            elif variant in ("ours", "ours_async"):
                cb = BestCheckpoint(
                    monitor="val_loss", dirpath=folder, top_k=3, snapshots=5, last=True,
                    async_save=variant == "ours_async",
                )
                callbacks.append(timer.attach(cb, common.hook_names(cb)))
            model = make_model()
            started = time.perf_counter()
            model.fit(x, y, validation_data=(xv, yv), batch_size=64, epochs=epochs, verbose=0, callbacks=callbacks)
            elapsed = time.perf_counter() - started
            if variant in callback_time:
                callback_time[variant].append(timer.seconds)
            files[variant] = sorted(os.listdir(folder))
            keras.backend.clear_session()
            return elapsed

        common.note("warm-up fits (graph tracing, first-call costs; not counted) ...")
        for variant in ("none",) if args.quick else ("none", "ours", "native", "ours_async"):
            fit(variant)
        for values in callback_time.values():
            values.clear()
        variants = {name: (lambda name=name: fit(name)) for name in ("none", "native", "ours", "ours_async")}
        common.note(f"{repetitions} fits of {epochs} epochs per variant, alternated ...")
        times = common.alternate(variants, repetitions, between=os.sync)

    common.emit(
        common.fit_overhead_result(
            header,
            times,
            callback_time,
            epochs,
            files,
        )
    )


if __name__ == "__main__":
    main()
