"""Local temporary folders of this process: a remote store's staging and downloads, other ranks' scratch.

Each is named `checkpoint_hooks-<use>-<host>-<pid>-<random>` in the system's temporary folder
(`$TMPDIR`). A process killed mid-save cannot remove its own, and a sharded save's copy there can
be large; so the first folder a process makes here comes after a sweep that removes the folders of
processes that have ended: this user's, made on this host (a hash of its name, so a temporary
folder shared by containers or machines is left to the others).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator

from checkpoint_hooks.core.lock import _pid_alive

PREFIX = "checkpoint_hooks-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_NAME = re.compile(r"^checkpoint_hooks-[a-z]+-([0-9a-f]{8})-(\d+)-[a-z0-9_]+$")
_swept = False
_lock = threading.Lock()


def folder(use: str) -> str:
    """A new temporary folder for `use` (a lowercase word); the caller removes it."""
    global _swept
    with _lock:
        if not _swept:
            _swept = True
            sweep()
    return tempfile.mkdtemp(prefix=f"{PREFIX}{use}-{_HOST}-{os.getpid()}-")


@contextlib.contextmanager
def temporary(use: str) -> Iterator[str]:
    """A temporary folder for `use`, removed on exit whatever happens."""
    path = folder(use)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep(root: str | None = None) -> list[str]:
    """Remove the folders that processes of this user on this host left in `root` (default: `$TMPDIR`)
    and that have ended; returns their names."""
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match is None or match.group(1) != _HOST:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed
