"""The one check for paths that come from a checkpoint directory, which may be written by someone else.

Record paths and names are read from the index, the journal and the sidecars; a copied
run folder or a shared bucket can hold anything there. Before any of them is read,
hashed or deleted it must be a plain relative path that stays inside the directory:

* lexically (`relative_path`, at parse time): not empty, not absolute, no `.` or `..`
  component, no empty component, no backslash or NUL, at most `MAX_PATH` characters and
  `MAX_COMPONENT` bytes per component;
* on a local disk (`within`, at use time): the folder holding it, with symlinks resolved,
  is the directory or below it. The last component is never followed: `open_regular`
  opens with `O_NOFOLLOW` and accepts only regular files, so a symlink, a FIFO or a
  device is refused instead of read (or waited on).
"""

from __future__ import annotations

import errno
import os
import stat

from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.policy import short_repr

MAX_PATH = 4096
MAX_COMPONENT = 255  # bytes, as most filesystems count


class UnsafePathError(CheckpointError, ValueError):
    """A path from a checkpoint directory leaves it, or names something that is not a regular file."""


def relative_path(path: object, what: str = "path") -> str:
    """`path` when it is a plain relative path inside a checkpoint directory; UnsafePathError otherwise."""
    reason = _lexical_problem(path)
    if reason is not None:
        raise UnsafePathError(f"{what} {short_repr(path)} {reason}")
    assert isinstance(path, str)
    return path


def _lexical_problem(path: object) -> str | None:
    if not isinstance(path, str):
        return f"is a {type(path).__name__}, not a path"
    if not path:
        return "is empty"
    if len(path) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if "\x00" in path or "\\" in path:
        return "holds a NUL or a backslash"
    if path.startswith("/") or os.path.isabs(path):
        return "is absolute: it must be relative to the checkpoint directory"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return "leaves the checkpoint directory (a '..', '.' or empty component)"
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT:
            return f"has a component longer than {MAX_COMPONENT} bytes"
    return None


def within(root: str, real: str) -> bool:
    """Whether the resolved path `real` is the resolved directory `root` or below it."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of `path`, which must be a regular file and not a symlink; never blocks on a FIFO.

    Raises:
        FileNotFoundError: nothing is there.
        UnsafePathError: a symlink, a FIFO, a device, a folder or a socket.
    """
    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | extra, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path!r} is a symbolic link; checkpoint files are never followed through links") from None
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise UnsafePathError(f"{path!r} is not a regular file (a FIFO)") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafePathError(f"{path!r} is not a regular file ({_kind(mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def other_owner(path: str) -> int | None:
    """The user id owning `path` or its folder when that is not this process's user; None otherwise."""
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is None:
        return None
    for candidate in (path, os.path.dirname(os.path.abspath(path))):
        try:
            owner = os.stat(candidate).st_uid
        except OSError:
            continue
        if owner != uid:
            return owner
    return None


def printable(text: object) -> str:
    """`text` with every character a terminal could act on shown escaped (`\\x1b`, `\\x0a`, `\\u202e`).

    Names in a checkpoint directory may be written by anyone: printed raw, an escape
    sequence in one could retitle, clear or rewrite the user's terminal, and a newline
    could forge a line of output. Printable characters (any script) are kept as they are.
    """
    value = str(text)
    if value.isprintable():
        return value
    return "".join(char if char.isprintable() else _escaped(char) for char in value)


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
