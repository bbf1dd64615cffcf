"""One writer per checkpoint directory.

Locally an `fcntl.flock` on a lock file: the kernel releases it when the
holder dies, so a stale lock is simply taken over. The file's JSON (pid, host,
start time) names the holder in the error a second run gets. On remote stores
the lock is advisory: a lock object naming a live holder on this host, or any
holder on another host, refuses the second run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Any

from checkpoint_hooks.core.errors import CheckpointError, LockError
from checkpoint_hooks.core.paths import UnsafePathError, open_regular, printable

LOCK_NAME = ".checkpoint_hooks.lock"
log = logging.getLogger("checkpoint_hooks")

# Locks this process holds, by directory: a second fit() in the same process (a notebook
# re-running a cell after an exception) takes over the lock its earlier run never released.
_HELD: dict[str, DirectoryLock] = {}


def _holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    # the lock file may be written by anyone: its values are shown escaped and short
    pid, host = (printable(info.get(key, "?"))[:64] for key in ("pid", "host"))
    return f"pid {pid} on host {host}, started {when}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """Held from `acquire()` to `release()`; `store` is a LocalStore or FsspecStore."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._fd: int | None = None
        self._held = False
        # whether the previous holder ended without releasing (killed, crashed): then an
        # interrupted save may have left files behind
        self.unclean = False

    def _conflict(self, info: dict[str, Any]) -> LockError:
        return LockError(
            f"checkpoint directory {self.store.url!r} is in use by another run ({_describe(info)}); "
            "point this run at another dirpath, or stop that run. If that process is gone, delete "
            f"{self.store.join(LOCK_NAME)!r}"
        )

    def acquire(self) -> None:
        if self._held:
            return
        earlier = _HELD.get(self.store.url)
        if earlier is not None and earlier is not self:
            log.warning("%s was still locked by an earlier run in this process; taking it over", self.store.url)
            earlier.release()
        if self.store.is_local:
            self._acquire_local()
        else:
            self._acquire_remote()
        self._held = True
        _HELD[self.store.url] = self

    def _acquire_local(self) -> None:
        import fcntl

        path = self.store.join(LOCK_NAME)
        try:
            self.store.ensure()
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoints to {self.store.url!r}: {exc.strerror or exc}; "
                "point dirpath at a directory this process can write"
            ) from None
        except UnsafePathError as exc:
            raise CheckpointError(f"refusing the lock file: {exc}; remove it if this directory is yours") from None
        if os.fstat(fd).st_nlink > 1:
            os.close(fd)
            raise CheckpointError(
                f"refusing the lock file {path!r}: it has other hard links, and taking the lock would empty them; "
                "remove it if this directory is yours"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            info = self._read(fd)
            os.close(fd)
            raise self._conflict(info) from None
        previous = self._read(fd)
        self.unclean = bool(previous)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.warning("taking over the lock of %s left by %s, which has ended", self.store.url, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = os.pread(fd, 4096, 0)
            info = json.loads(data.decode()) if data else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _acquire_remote(self) -> None:
        raw = self.store.read_bytes(LOCK_NAME)
        self.unclean = bool(raw)
        if raw:
            try:
                info = json.loads(raw.decode())
            except ValueError:
                info = {}
            same_host = info.get("host") == socket.gethostname()
            pid = info.get("pid")
            if same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                log.warning("taking over the lock of %s left by %s, which has ended", self.store.url, _describe(info))
            elif not (same_host and pid == os.getpid()):
                raise self._conflict(info)
        self.store.write_bytes(LOCK_NAME, json.dumps(_holder_info()).encode())

    def release(self, *, as_crashed: bool = False) -> None:
        """Free the directory; `as_crashed` leaves the holder's note, so the next start cleans up as after a crash."""
        if not self._held:
            return
        self._held = False
        if _HELD.get(self.store.url) is self:
            del _HELD[self.store.url]
        if self._fd is not None:
            # Leave the file; an empty one means "free", and unlinking would race a waiting taker.
            if not as_crashed:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
        elif not as_crashed:
            with contextlib.suppress(Exception):
                self.store.remove(LOCK_NAME)

    @property
    def held(self) -> bool:
        return self._held
