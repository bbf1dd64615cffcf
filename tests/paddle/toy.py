"""Tiny data, networks and recording callbacks shared by the Paddle tests and their subprocess scripts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle

from tests.index import read_index

W_TRUE = np.array([[0.1], [0.2], [0.3], [0.4]], dtype="float32")
# Added to the evaluation targets at epoch e: they dominate val_loss, so its ranking is known
# in advance: 3 < 1 < 5 < 0 < 2 < 4 (best first).
VAL_OFFSETS = (30.0, 10.0, 40.0, 5.0, 50.0, 20.0)
STEPS_PER_EPOCH = 4  # 32 samples, batch size 8


class Regression(paddle.io.Dataset):
    """y = x @ W_TRUE (+ an offset per epoch, for evaluation data)."""

    def __init__(self, n: int = 32, seed: int = 0, offsets: Sequence[float] | None = None) -> None:
        super().__init__()
        rng = np.random.RandomState(seed)
        self.x = rng.randn(n, 4).astype("float32")
        self.y = (self.x @ W_TRUE).astype("float32")
        self.offsets = offsets
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        offset = self.offsets[self.epoch] if self.offsets else 0.0
        return self.x[i], self.y[i] + np.float32(offset)


class Classes(paddle.io.Dataset):
    """Two classes split by the sign of x0 + x1."""

    def __init__(self, n: int = 32, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.RandomState(seed)
        self.x = rng.randn(n, 4).astype("float32")
        self.y = (self.x[:, :1] + self.x[:, 1:2] > 0).astype("int64")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


def regression_model(
    seed: int = 0, *, scheduler: bool = True, dropout: bool = False, inputs: bool = False
) -> paddle.Model:
    """Linear-tanh-linear regression with Adam and (by default) a StepDecay schedule."""
    paddle.seed(seed)
    layers: list[paddle.nn.Layer] = [paddle.nn.Linear(4, 8), paddle.nn.Tanh()]
    if dropout:
        layers.append(paddle.nn.Dropout(0.3))
    layers.append(paddle.nn.Linear(8, 1))
    net = paddle.nn.Sequential(*layers)
    spec = [paddle.static.InputSpec([None, 4], "float32", "x")] if inputs else None
    model = paddle.Model(net, inputs=spec)
    lr: Any = paddle.optimizer.lr.StepDecay(0.05, step_size=5, gamma=0.5) if scheduler else 0.05
    model.prepare(paddle.optimizer.Adam(lr, parameters=net.parameters()), paddle.nn.MSELoss())
    return model


def classifier_model(seed: int = 0, *, inputs: bool = False) -> paddle.Model:
    paddle.seed(seed)
    net = paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 2))
    spec = [paddle.static.InputSpec([None, 4], "float32", "x")] if inputs else None
    model = paddle.Model(net, inputs=spec)
    model.prepare(
        paddle.optimizer.Adam(0.05, parameters=net.parameters()), paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy()
    )
    return model


class Recorder(paddle.callbacks.Callback):
    """Which epochs really trained, and the per-epoch mean losses computed on its own."""

    def __init__(self, eval_data: Regression | None = None) -> None:
        super().__init__()
        self.eval_data = eval_data
        self.trained: list[int] = []
        self.loss: dict[int, float] = {}
        self.val_loss: dict[int, float] = {}
        self._epoch = -1
        self._sums = [0.0, 0.0]

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._sums = [0.0, 0.0]
        if self.eval_data is not None:
            self.eval_data.epoch = epoch

    def on_train_batch_end(self, step: int, logs: Any = None) -> None:
        self._sums[0] += float(logs["loss"][0]) * logs["batch_size"]
        self._sums[1] += logs["batch_size"]

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs:
            self.trained.append(epoch)
            self.loss[epoch] = self._sums[0] / self._sums[1]

    def on_eval_begin(self, logs: Any = None) -> None:
        self._sums = [0.0, 0.0]

    def on_eval_batch_end(self, step: int, logs: Any = None) -> None:
        self._sums[0] += float(logs["loss"][0]) * logs["batch_size"]
        self._sums[1] += logs["batch_size"]

    def on_eval_end(self, logs: Any = None) -> None:
        if self._sums[1]:
            self.val_loss[self._epoch] = self._sums[0] / self._sums[1]


def portable_state(model: paddle.Model) -> dict[str, np.ndarray]:
    """Parameters and optimizer state keyed by structured names, comparable across processes."""
    names = {p.name: name for name, p in model.network.named_parameters()}
    out = {"param/" + k: np.array(v.numpy()) for k, v in model.network.state_dict().items()}
    for key, value in model._optimizer.state_dict().items():
        if key == "LR_Scheduler":
            for k, v in value.items():
                out["lr/" + k] = np.array(v)
            continue
        for pname in sorted(names, key=len, reverse=True):
            if key.startswith(pname + "_"):
                key = names[pname] + key[len(pname):]
                break
        out["opt/" + key] = np.array(value.numpy() if hasattr(value, "numpy") else value)
    out["lr/current"] = np.array(model._optimizer.get_lr())
    return out


def listing(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


def manifest_records(directory: str) -> list[dict[str, Any]]:
    data = read_index(directory)
    return [
        {"name": r["name"], "epoch": r["epoch"], "step": r["step"], "tags": sorted(r["tags"]), "format": r["format"]}
        for r in data["records"]
    ]
