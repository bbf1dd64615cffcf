"""SigtermWatch: SIGTERM becomes a flag during a fit, then takes its previous course."""

from __future__ import annotations

import os
import signal

from checkpoint_hooks.core.preemption import SigtermWatch


def test_sigterm_is_noted_then_handed_to_the_previous_handler():
    received = []
    noted = []
    users = lambda signum, frame: received.append(signum)  # noqa: E731
    before = signal.signal(signal.SIGTERM, users)
    try:
        watch = SigtermWatch(on_signal=lambda: noted.append(True))
        assert watch.install() and watch.installed
        os.kill(os.getpid(), signal.SIGTERM)
        assert noted == [True] and received == []  # only noted: the adapter saves at its next safe point
        watch.end_process()
        assert received == [signal.SIGTERM]  # the user's handler ran, as without the watch
        assert signal.getsignal(signal.SIGTERM) is users and not watch.installed
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_stale_watch_steps_aside():
    received, stale = [], []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        watch = SigtermWatch(on_signal=lambda: None, is_current=lambda frame: False, on_stale=lambda: stale.append(1))
        watch.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stale == [1] and received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_ignored_sigterm_stays_ignored():
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert not SigtermWatch(on_signal=lambda: None).install()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
