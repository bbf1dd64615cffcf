"""Fit overhead, PaddlePaddle hapi: BestCheckpoint vs fit(save_dir=..., save_freq=1) vs no checkpointing.

    python benchmarks/fit_overhead_paddle.py            # 20 epochs, 7 fits per variant
    python benchmarks/fit_overhead_paddle.py --quick    # 3 epochs, 2 fits per variant

A small MLP (32-256-256-1, about 75k parameters, Adam) on 2,048 random samples, 32 steps
per epoch, evaluation every epoch, a checkpoint that is saved every epoch:

* none:   model.fit(..., save_dir=None)
* native: model.fit(..., save_dir=<dir>, save_freq=1)   (hapi's ModelCheckpoint: <epoch>.pdparams/.pdopt, final)
* ours:   model.fit(..., callbacks=[BestCheckpoint(monitor="val_loss", top_k=3, snapshots=5, last=True)])
* ours_async: the same with async_save=True (the files are written at the epoch end; hashing, fsync,
  commit and pruning run in the background)

Each fit gets a fresh folder; the variants are interleaved fit by fit (a shuffled order each round) and os.sync() runs untimed
between fits. hapi prints a line per native save: stdout is silenced during fits so that it
holds only the JSON. Reported: wall time of `model.fit` per variant, ours/native (target
<= 1.00), the time spent inside the checkpoint callback's hooks, and the files each leaves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import _common as common

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from checkpoint_hooks.paddle import BestCheckpoint  # noqa: E402


class Data(paddle.io.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


def datasets() -> tuple[Data, Data]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2560, 32), dtype=np.float32)
    y = (np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * rng.standard_normal((2560, 1))).astype(np.float32)
    return Data(x[:2048], y[:2048]), Data(x[2048:], y[2048:])


def make_model() -> paddle.Model:
    paddle.seed(0)
    net = paddle.nn.Sequential(
        paddle.nn.Linear(32, 256), paddle.nn.ReLU(), paddle.nn.Linear(256, 256), paddle.nn.ReLU(), paddle.nn.Linear(256, 1)
    )
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Adam(1e-3, parameters=net.parameters()), paddle.nn.MSELoss())
    return model


def time_class_hooks(cls: type, names: tuple[str, ...], timer: Callable[[], common.HookTimer]) -> None:
    """Wrap hooks on the class: hapi builds its own ModelCheckpoint inside fit(save_dir=...)."""
    for name in names:
        original = cls.__dict__[name]

        def wrapped(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            return timer().wrap(_original)(self, *args, **kwargs)

        setattr(cls, name, wrapped)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs per fit (default 20, --quick 3)")
    args = p.parse_args()
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 20)
    repetitions = common.reps(args, default=7)
    logging.getLogger("checkpoint_hooks").setLevel(logging.ERROR)
    paddle.set_device("cpu")
    train, val = datasets()
    callback_time: dict[str, list[float]] = {"native": [], "ours": [], "ours_async": []}
    files: dict[str, list[str]] = {}
    current = [common.HookTimer()]
    # BestCheckpoint overrides every one of these, so this times hapi's own callback only.
    time_class_hooks(paddle.callbacks.ModelCheckpoint, ("on_epoch_begin", "on_epoch_end", "on_train_end"), lambda: current[0])

    with common.workdir(args, "fit-paddle") as root:
        counter = iter(range(10**9))

        def fit(variant: str) -> float:
            folder = common.fresh(os.path.join(root, f"{variant}-{next(counter)}"))
            timer = current[0] = common.HookTimer()
            callbacks: list[Any] = []
            save_dir = None
            if variant == "native":
                save_dir = folder
            elif variant in ("ours", "ours_async"):
                cb = BestCheckpoint(
                    monitor="val_loss", dirpath=folder, top_k=3, snapshots=5, last=True,
                    async_save=variant == "ours_async",
                )
                callbacks.append(timer.attach(cb, common.hook_names(cb)))
            model = make_model()
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                started = time.perf_counter()
                model.fit(
                    train,
                    val,
                    batch_size=64,
                    epochs=epochs,
                    shuffle=True,
                    verbose=0,
                    save_dir=save_dir,
                    save_freq=1,
                    callbacks=callbacks,
                )
                elapsed = time.perf_counter() - started
            if variant in callback_time:
                callback_time[variant].append(timer.seconds)
            files[variant] = sorted(os.listdir(folder))
            return elapsed

        common.note("warm-up fits (first-call costs; not counted) ...")
        for variant in ("none", "ours", "native", "ours_async"):
            fit(variant)
        for values in callback_time.values():
            values.clear()
        variants = {name: (lambda name=name: fit(name)) for name in ("none", "native", "ours", "ours_async")}
        common.note(f"{repetitions} fits of {epochs} epochs per variant, alternated ...")
        times = common.alternate(variants, repetitions, between=os.sync)

    common.emit(
        common.fit_overhead_result(
            common.header("fit_overhead_paddle", paddle=paddle.__version__, epochs=epochs, repetitions=repetitions),
            times,
            callback_time,
            epochs,
            files,
        )
    )


if __name__ == "__main__":
    main()
