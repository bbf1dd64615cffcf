"""What hapi's fit() needs around it: a safe point between batches, epoch means, its logs, its fit frame."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

import numpy as np
import paddle

log = logging.getLogger("checkpoint_hooks")

# Keys hapi puts into its logs that are bookkeeping, not metrics.
_NOT_METRICS = frozenset({"step", "batch_size"})


def inference_extension() -> str:
    """Where a `model` checkpoint's program file goes, relative to its name.

    Each inference model gets a folder of its own, `<name>/model.json` and
    `<name>/model.pdiparams`: `paddle.jit.load` reads every `<prefix>.<x>.json` next
    to the model as another function, and the checkpoint sidecars are named
    `<name>.meta.json`. With the legacy program format (PIR switched off) it is `.pdmodel`.
    """
    use_pir = getattr(paddle.framework, "use_pir_api", None)
    return "/model" + (".json" if use_pir is None or use_pir() else ".pdmodel")


class BetweenBatches:
    """A training data loader that calls `hook` after every batch, before the next one is drawn.

    hapi asks for the next batch once every callback's hooks of the current one ran (the
    LRScheduler callback steps after ours), so the state seen there is complete, as at an epoch
    end. The epoch ends early when `hook` returns True (training was asked to stop).
    """

    def __init__(self, loader: Any, hook: Callable[[], bool]) -> None:
        self.loader = loader
        self.hook = hook
        self.iterator: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.iterator = iter(self.loader)
        for batch in self.iterator:
            yield batch
            if self.hook():
                return

    def close(self) -> None:
        """Stop the loader's worker processes, which a process ended by a signal would leave running."""
        if getattr(self.iterator, "_workers", None):  # Paddle's multi-process iterator
            try:
                self.iterator._try_shutdown_all(5)
            except Exception as exc:
                log.debug("could not stop the data loader's workers: %s", exc)


class EpochMean:
    """Batch-size weighted mean of the loss over one epoch's batches."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    def add(self, logs: Mapping[str, Any] | None) -> None:
        if not logs or "loss" not in logs:
            return
        loss = logs["loss"]
        values = loss if isinstance(loss, (list, tuple)) else [loss]
        try:
            # hapi logs Python floats: summed without numpy, which is most of a batch's cost here
            value = float(sum(v if isinstance(v, float) else float(np.asarray(v).sum()) for v in values))
        except (TypeError, ValueError):
            return
        weight = float(logs.get("batch_size") or 1)
        self.total += value * weight
        self.count += weight

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


def metrics(logs: Mapping[str, Any] | None, names: Any) -> dict[str, Any]:
    """A copy of the metrics in hapi's logs.

    hapi keeps one logs dict for training and evaluation, for the whole process (a
    mutable default argument): it must be copied, and keys left by an earlier fit
    or evaluate (a metric this model does not have) are dropped by keeping only
    the names hapi declares for this run.
    """
    items = dict(logs or {})
    if isinstance(names, (list, tuple)) and names:
        return {k: items[k] for k in names if k in items}
    return {k: v for k, v in items.items() if k not in _NOT_METRICS}


def has_loss(names: Any) -> bool:
    """Whether hapi declares a loss for this run (a stale 'loss' can linger in its shared logs)."""
    return not isinstance(names, (list, tuple)) or "loss" in names


def fit_frame() -> FrameType | None:
    """The frame of the `paddle.Model.fit` that is calling back (None: callbacks driven by hand)."""
    code = paddle.Model.fit.__code__
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def below(frame: FrameType | None, ancestor: FrameType) -> bool:
    """Whether `ancestor` is on the stack of `frame`."""
    while frame is not None:
        if frame is ancestor:
            return True
        frame = frame.f_back
    return False


def fit_arguments(frame: FrameType | None) -> dict[str, Any]:
    """What the running `Model.fit` was given and built: its `save_dir`, `save_freq` and CallbackList (`cbks`).

    hapi hands `save_dir` and `save_freq` only to the ModelCheckpoint it adds when the callbacks
    hold none, so a BestCheckpoint (a ModelCheckpoint) reads them from fit's frame. Empty when
    the callbacks are driven by hand.
    """
    if frame is None:
        return {}
    names = frame.f_locals
    return {name: names[name] for name in ("save_dir", "save_freq", "cbks") if name in names}
