"""One fit() of a BestCheckpoint: the frame it runs in, and `model.train_function` wrapped for its length.

Keras calls no callback when an exception escapes fit(). The wrapper sees one that
escapes a training step (Ctrl-C during a step included) and hands it over before it
propagates; the end of a dataset of unknown length is not a failure. An exception
raised elsewhere (another callback, validation) ends fit() unseen: the wrapper, a
SIGTERM, or the next fit() then finds its fit() frame gone and ends the session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

_ORIGINAL = "_checkpoint_hooks_original"  # on a wrapped train_function: the function it wraps
_END_IF_STALE = "_checkpoint_hooks_end_if_stale"  # on a wrapped train_function: ends its fit's session if over
# How a dataset of unknown length ends an epoch: not a failure.
_END_OF_DATA = ("StopIteration", "OutOfRangeError")


class FitGuard:
    """Where one fit() runs, and the wrapper of its training step.

    Args:
        on_exception: called with an exception escaping a training step, before it propagates.
        on_stale: ends the fit's session when a wrapper left on the model finds its fit() over.
    """

    def __init__(self, on_exception: Callable[[BaseException], None], on_stale: Callable[[], None]) -> None:
        self._on_exception = on_exception
        self._on_stale = on_stale
        self.active = False
        self.frame: FrameType | None = None
        self.wrapper: Callable[..., Any] | None = None
        self._model: Any = None

    def begin(self, model: Any, *, wrap: bool) -> None:
        """A fit() of `model` starts (called from its on_train_begin); `wrap` its training step."""
        self.active = True
        self.frame = _fit_frame(model)
        if wrap:
            self._wrap(model)

    def end(self) -> None:
        """Put back the model's train_function; the fit is over. Safe to call more than once."""
        wrapper, self.wrapper = self.wrapper, None
        model, self._model = self._model, None
        if wrapper is not None and getattr(model, "train_function", None) is wrapper:
            model.train_function = getattr(wrapper, _ORIGINAL)
        self.frame = None
        self.active = False

    def running(self, frame: FrameType | None) -> bool:
        """Whether this fit() is on the stack below `frame` (an exception may have ended it unseen)."""
        if not self.active:
            return False
        if self.frame is None:
            return True  # callbacks driven by hand: on_train_end is the only end there is
        while frame is not None:
            if frame is self.frame:
                return True
            frame = frame.f_back
        return False

    @staticmethod
    def end_stale(model: Any) -> None:
        """End the sessions of earlier fits of `model` that an exception ended where no hook ran."""
        function = getattr(model, "train_function", None) if model is not None else None
        # Another BestCheckpoint of this fit() may have wrapped it already: that one is alive and stays.
        while callable(getattr(function, _END_IF_STALE, None)) and getattr(function, _END_IF_STALE)():
            # Its owner put its SIGTERM handler back, released its lock and unwrapped it.
            following = getattr(model, "train_function", None)
            if following is function:
                break
            function = following

    def _wrap(self, model: Any) -> None:
        original = getattr(model, "train_function", None)
        if original is None or self.frame is None:
            return

        def train_function(*args: Any, **kwargs: Any) -> Any:
            if not alive(sys._getframe(1)):
                # Left on the model by a fit() that ended unseen: train_on_batch, a later fit() without us.
                end()
                return original(*args, **kwargs)
            try:
                return original(*args, **kwargs)
            except BaseException as exc:
                if type(exc).__name__ not in _END_OF_DATA:
                    self._on_exception(exc)
                raise

        def alive(frame: FrameType | None) -> bool:
            return self.wrapper is train_function and self.running(frame)

        def end() -> None:
            if self.wrapper is train_function:
                self._on_stale()
            if getattr(model, "train_function", None) is train_function:
                model.train_function = original

        def end_if_stale() -> bool:
            if alive(sys._getframe()):
                return False
            end()
            return True

        setattr(train_function, _ORIGINAL, original)
        setattr(train_function, _END_IF_STALE, end_if_stale)
        model.train_function = train_function
        self.wrapper = train_function
        self._model = model


def _fit_frame(model: Any) -> FrameType | None:
    """The frame of the model's fit() that is calling; None outside Model.fit."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            return frame
        frame = frame.f_back
    return None
