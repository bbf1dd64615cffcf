"""SIGTERM during a fit: noted by a handler, acted on by the adapter at its next safe point.

Schedulers and spot instances send SIGTERM before they stop a job. Saving inside
the signal handler could interrupt a training step half-way, so the handler only
reports the request; the adapter saves between batches, then `end_process()`
puts back the handler that was there before the fit and raises the signal again,
so the process ends as SIGTERM would have ended it, or the user's own handler runs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("checkpoint_hooks")


class SigtermWatch:
    """The SIGTERM handler of one fit.

    Args:
        on_signal: called (inside the handler) when SIGTERM arrives for this fit; should only set a flag.
        is_current: whether the fit is still running, given the interrupted frame; False when an
            exception ended it where no hook could uninstall the handler.
        on_stale: called before SIGTERM takes its previous course for a fit that is no longer running.
    """

    def __init__(
        self,
        on_signal: Callable[[], None],
        is_current: Callable[[FrameType | None], bool] | None = None,
        on_stale: Callable[[], None] | None = None,
    ) -> None:
        self._on_signal = on_signal
        self._is_current = is_current
        self._on_stale = on_stale
        self.previous: Any = None
        self._pid = -1

    @property
    def installed(self) -> bool:
        return self.previous is not None

    def install(self) -> bool:
        """Catch SIGTERM (only the main thread can), keeping the handler it replaces."""
        if threading.current_thread() is not threading.main_thread():
            log.info("fit() runs outside the main thread, where SIGTERM cannot be caught; no save on preemption")
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None or previous == signal.SIG_IGN:
            return False  # a handler set outside Python could not be put back; an ignored SIGTERM stays ignored
        self.previous = previous
        self._pid = os.getpid()
        signal.signal(signal.SIGTERM, self._handle)
        return True

    def restore(self) -> None:
        """Put back the previous handler, unless someone replaced ours since (then theirs stays)."""
        previous, self.previous = self.previous, None
        if previous is None or signal.getsignal(signal.SIGTERM) != self._handle:
            return
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:  # not in the main thread
            log.warning("could not put back the SIGTERM handler: fit() ended outside the main thread")

    def end_process(self) -> None:
        """After the save: SIGTERM takes the course it would have taken without us."""
        self.restore()
        signal.raise_signal(signal.SIGTERM)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # a forked child (a data loader worker) inherited this handler: it acts as the one before
            signal.signal(signum, self.previous if self.previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if self._is_current is not None and not self._is_current(frame):
            if self._on_stale is not None:
                self._on_stale()
            self.end_process()
            return
        self._on_signal()
