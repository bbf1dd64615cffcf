"""BestCheckpoint in a PaddlePaddle `Model.fit`. Run it twice: the second run continues where the first ended.

    python examples/paddle_quickstart.py --epochs 3     # trains epochs 0-2
    python examples/paddle_quickstart.py --epochs 6     # continues with epochs 3-5
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import paddle

from checkpoint_hooks.paddle import BestCheckpoint


class Points(paddle.io.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


def datasets() -> tuple[Points, Points]:
    rng = np.random.RandomState(0)
    x = rng.randn(512, 8).astype("float32")
    y = (x @ rng.randn(8, 1) + 0.1 * rng.randn(512, 1)).astype("float32")
    return Points(x[:400], y[:400]), Points(x[400:], y[400:])


class Pause(paddle.callbacks.Callback):
    """Sleeps at each epoch end."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--dir", default="checkpoints/paddle")
    parser.add_argument("--epoch-seconds", type=float, default=0.0, help="slow each epoch down (the demo kills the run from outside mid-run)")
    args = parser.parse_args()
    # Saves, prunes and the resume point are logged at INFO on the "checkpoint_hooks" logger.
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(8, 32), paddle.nn.ReLU(), paddle.nn.Linear(32, 1))
    model = paddle.Model(net, inputs=[paddle.static.InputSpec([None, 8], "float32", "x")])
    schedule = paddle.optimizer.lr.StepDecay(0.01, step_size=2, gamma=0.5)
    model.prepare(paddle.optimizer.Adam(schedule, parameters=net.parameters()), paddle.nn.MSELoss())
    # hapi steps the schedule once per batch unless told otherwise; here once per epoch.
    callbacks = [
        BestCheckpoint(monitor="val_loss", dirpath=args.dir, top_k=2, snapshots=2, verbose=True),
        paddle.callbacks.LRScheduler(by_step=False, by_epoch=True),
    ]
    if args.epoch_seconds:
        callbacks.append(Pause(args.epoch_seconds))
    train, val = datasets()
    model.fit(train, val, batch_size=32, epochs=args.epochs, shuffle=True, verbose=0, callbacks=callbacks)
    checkpoint = callbacks[0]
    print(f"best: {checkpoint.best_model_path} (val_loss={checkpoint.best_model_score:.4f})")
    print(f"last: {checkpoint.last_model_path}")


if __name__ == "__main__":
    main()
