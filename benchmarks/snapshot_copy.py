"""Snapshot copy: what async_save's copy of a Keras or Paddle state costs the training thread, into new or kept arrays.

    python benchmarks/snapshot_copy.py --framework paddle          # a 512 MiB float32 model, 7 repetitions
    python benchmarks/snapshot_copy.py --framework keras
    python benchmarks/snapshot_copy.py --framework paddle --quick  # 32 MiB, 2 repetitions

One framework per process (TensorFlow and then Paddle in one process crash). The model is a
stack of 2048x2048 dense layers (16 MiB of float32 each) with an Adam optimizer that has taken
one step, so the optimizer's moments are as large as the weights: about --mib MiB in all.

Variants, alternated copy by copy (each copy is dropped, or its arrays recycled, before the next):

* new_arrays: the adapter's snapshot with new arrays every time (`HostBuffers` off): every page of
  the copy is a fresh page.
* kept_arrays: the same snapshot into arrays kept from the copy before (what async_save does for
  tensors of 1 MiB or more).
* convert_to_numpy (Keras only): the same snapshot into new arrays, each variable read through
  `keras.ops.convert_to_numpy` (which copies it twice with TensorFlow) and then copied, as the
  snapshot read variables before it viewed TensorFlow's buffer in place.

Reported: the median time of each, kept_arrays / new_arrays, and (Keras) new_arrays / convert_to_numpy.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import _common as common

MiB = common.MiB
LAYER = 2048  # 2048 x 2048 float32 = 16 MiB per weight matrix


def paddle_variants(mib: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    import numpy as np
    import paddle

    from checkpoint_hooks.core.buffers import HostBuffers
    from checkpoint_hooks.paddle import _host_copy

    paddle.set_device("cpu")
    layers = max(1, mib // 48)  # weight + two Adam moments per layer
    net = paddle.nn.Sequential(*[paddle.nn.Linear(LAYER, LAYER) for _ in range(layers)])
    optimizer = paddle.optimizer.Adam(1e-3, parameters=net.parameters())
    net(paddle.ones([2, LAYER])).sum().backward()
    optimizer.step()
    buffers: HostBuffers[Any] = HostBuffers(np.empty)

    def state() -> list[dict[str, Any]]:
        return [net.state_dict(), optimizer.state_dict()]

    def kept() -> None:
        buffers.recycle()
        for part in state():
            _host_copy(part, buffers)

    variants = {"new_arrays": lambda: [_host_copy(part) for part in state()], "kept_arrays": kept}
    size = sum(int(np.prod(p.shape)) * 4 for p in net.parameters()) * 3
    return variants, {"paddle": paddle.__version__, "layers": layers, "state_mib": round(size / MiB, 1)}


def keras_variants(mib: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    import keras
    import numpy as np

    from checkpoint_hooks.core.buffers import HostBuffers
    from checkpoint_hooks.keras import snapshot

    layers = max(1, mib // 48)
    model = keras.Sequential([keras.Input((LAYER,)), *[keras.layers.Dense(LAYER) for _ in range(layers)]])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((2, LAYER), "float32"), np.ones((2, LAYER), "float32"))
    buffers: HostBuffers[Any] = HostBuffers(np.empty)

    def kept() -> None:
        buffers.recycle()
        snapshot.take(model, buffers=buffers).discard()

    def converted() -> None:
        view = snapshot._host_view
        snapshot._host_view = lambda value: np.asarray(keras.ops.convert_to_numpy(value))  # type: ignore[assignment]
        try:
            snapshot.take(model).discard()
        finally:
            snapshot._host_view = view  # type: ignore[assignment]

    variables = [*model.weights, *model.optimizer.variables]
    variants = {"new_arrays": lambda: snapshot.take(model).discard(), "kept_arrays": kept, "convert_to_numpy": converted}
    size = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    return variants, {"keras": keras.__version__, "backend": keras.backend.backend(), "layers": layers, "state_mib": round(size / MiB, 1)}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("paddle", "keras"), required=True)
    p.add_argument("--mib", type=int, default=None, help="about this many MiB of state (default 512, --quick 32)")
    args: argparse.Namespace = p.parse_args()
    mib = args.mib if args.mib is not None else (32 if args.quick else 512)
    repetitions = common.reps(args, default=7)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    build = paddle_variants if args.framework == "paddle" else keras_variants
    common.note(f"building a {args.framework} model of about {mib} MiB ...")
    variants, fields = build(mib)
    for run in variants.values():  # first-call costs, and the kept arrays' first allocation
        run()
    times = common.alternate({name: (lambda run=run: (run(), None)[1]) for name, run in variants.items()}, repetitions)
    result: dict[str, Any] = {
        **common.header("snapshot_copy", framework=args.framework, repetitions=repetitions, **fields),
        "copy_s": {name: common.summary(values) for name, values in times.items()},
        "ratio_kept_over_new_arrays": common.ratio(times["kept_arrays"], times["new_arrays"]),
    }
    if "convert_to_numpy" in times:
        result["ratio_new_arrays_over_convert_to_numpy"] = common.ratio(times["new_arrays"], times["convert_to_numpy"])
        result["ratio_kept_arrays_over_convert_to_numpy"] = common.ratio(times["kept_arrays"], times["convert_to_numpy"])
    common.emit(result)


if __name__ == "__main__":
    main()
