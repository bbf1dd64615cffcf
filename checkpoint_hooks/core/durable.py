"""Checksums and durability at the pace of the write.

Making a checkpoint durable costs a hash of its bytes and an fsync. Done one after the
other once the writer returns, they add about 0.65 s per GiB here to a write of 0.8 s.
This module hides most of it:

* `DurableFile`, a file object for writers that write to one (torch.save does): each large
  write is hashed on a helper thread while the same bytes go to the page cache, and the
  writeback of what is written starts every `WRITEBACK_STEP` bytes. When the writer returns,
  the checksum is known (`hashing.checksum_file` takes it instead of reading the file back)
  and the final fsync only flushes a short tail. Only bytes written in order are hashed this
  way: a seek elsewhere, a truncate or a `fileno()` (the writer may write behind our back)
  and the file is read back as for any writer.
* `saving_to_disk(folder)`: files written below the folder are headed for a local disk. A
  DurableFile fsyncs itself before it closes, through the descriptor it holds, so publishing
  it needs no second open and fsync. For any other writer, the writeback of what grows in the
  folder starts while the writer runs. Its bytes are not hashed on the way: a writer may seek
  back and patch what it wrote (zipfile does), so only the final bytes, read back, give the
  checksum.
* `syncing(path)`: a large file is fsynced on a helper thread while it is hashed.

Starting writeback early (sync_file_range, Linux) changes nothing about what is durable: the
fsync before the rename still makes it so. Elsewhere the early writeback is skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from checkpoint_hooks.core import hashing

log = logging.getLogger("checkpoint_hooks")

MiB = 1024 * 1024
WRITEBACK_STEP = 32 * MiB  # start the writeback of every this many new bytes
PARALLEL_MIN = 4 * MiB  # writes this large are hashed on a helper thread while they are written
GATHER = 1 * MiB  # smaller writes are gathered into one system call
SYNC_AHEAD_MIN = 64 * MiB  # files this large are fsynced while they are hashed
POLL = 0.02  # seconds between two looks at a folder a writer is writing into
IDLE_JOIN = 0.5  # seconds the end of the last watch waits for the thread to end

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes at `offset` to disk; returns without waiting for them.

    A hint: a failure here is not a lost write (the fsync that follows reports those).
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# -- writing through a file object -------------------------------------------------------------


_open_lock = threading.Lock()
_open_paths: set[str] = set()  # DurableFiles being written: they start their own writeback
_disk_folders: list[str] = []  # folders of `saving_to_disk` blocks running now, each ending with a separator


class DurableFile(io.RawIOBase):
    """A write-only binary file that hashes its bytes on their way to disk and starts their writeback early.

    Use it as `with DurableFile(path) as f: torch.save(obj, f)`. On a clean close, the checksum
    of what was written is remembered for `hashing.checksum_file(path)`.

    Args:
        path: the file to create (or truncate).
        algorithm: the checksum algorithm (the one `checksum_file` is asked for).
    """

    _fd = -1  # until the file is open (a failed open still meets close() through __del__)
    _helper: ThreadPoolExecutor | None = None

    def __init__(self, path: str | os.PathLike[str], algorithm: str = hashing.ALGORITHM) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        self._algorithm = algorithm
        self._hasher = hashing.new_hasher(algorithm)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._position = 0
        self._writeback_from = 0
        self._gathered = bytearray()
        self._in_order = True  # False once bytes may have changed behind the hash (then it is read back)
        with _open_lock:
            _open_paths.add(self.path)
            self._sync = any(self.path.startswith(folder) for folder in _disk_folders)

    # io.RawIOBase

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False  # writers that would seek back to patch a header take their streaming path

    def tell(self) -> int:
        return self._position + len(self._gathered)

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError(f"write to closed file {self.path!r}")
        view = memoryview(data).cast("B")
        size = view.nbytes
        if size < GATHER:
            self._gathered += view
            if len(self._gathered) >= GATHER:
                self._drain()
            return size
        self._drain()
        for start in range(0, size, WRITEBACK_STEP):
            self._write_hashed(view[start : start + WRITEBACK_STEP])
        return size

    def flush(self) -> None:
        if not self.closed and self._fd >= 0:
            self._drain()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            raise ValueError(f"whence must be os.SEEK_SET, SEEK_CUR or SEEK_END. Received: whence={whence!r}")
        if whence == os.SEEK_SET:
            target = offset
        elif whence == os.SEEK_CUR:
            target = self.tell() + offset
        else:
            self._drain()
            target = os.fstat(self._fd).st_size + offset
        if target == self.tell():
            return target  # a seek to where the file is (zipfile tries one) changes nothing
        self._drain()
        self._in_order = False
        self._position = os.lseek(self._fd, target, os.SEEK_SET)
        return self._position

    def truncate(self, size: int | None = None) -> int:
        self._drain()
        self._in_order = False
        size = self._position if size is None else size
        os.ftruncate(self._fd, size)
        return size

    def fileno(self) -> int:
        # whoever asks may write through the descriptor, unseen by the hash
        self._drain()
        self._in_order = False
        return self._fd

    def close(self) -> None:
        self._finish(remember=True)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._finish(remember=kind is None)  # a writer that failed left no checksum worth keeping

    # the work

    def _drain(self) -> None:
        if self._gathered:
            data, self._gathered = self._gathered, bytearray()
            if self._in_order:
                self._hasher.update(data)
            self._write_all(memoryview(data))

    def _write_hashed(self, view: memoryview) -> None:
        if view.nbytes < PARALLEL_MIN or not self._in_order:
            if self._in_order:
                self._hasher.update(view)
            self._write_all(view)
            return
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint_hooks-hash")
        # Both release the GIL; the hash (~5 GiB/s) ends before the write (~1.5 GiB/s) does.
        hashed: Future[None] = self._helper.submit(self._hasher.update, view)
        try:
            self._write_all(view)
        finally:
            # the caller may free its buffer once write() returns: the hash must be done with it
            hashed.result()

    def _write_all(self, view: memoryview) -> None:
        size = view.nbytes
        while view:
            view = view[os.write(self._fd, view) :]
        self._position += size
        if self._position - self._writeback_from >= WRITEBACK_STEP:
            start_writeback(self._fd, self._writeback_from, self._position - self._writeback_from)
            self._writeback_from = self._position

    def _finish(self, remember: bool) -> None:
        if self.closed:
            return
        try:
            if self._fd >= 0:
                try:
                    self._drain()
                    if remember and self._sync:
                        os.fsync(self._fd)  # its error fails the writer, and so the save
                    st = os.fstat(self._fd)
                    if remember and self._in_order and st.st_size == self._position:
                        checksum = f"{self._algorithm}:{self._hasher.hexdigest()}"
                        hashing.remember_written(self.path, checksum, self._position, st, synced=self._sync)
                finally:
                    with _open_lock:
                        _open_paths.discard(self.path)
                    if self._helper is not None:
                        self._helper.shutdown(wait=True)
                        self._helper = None
                    fd, self._fd = self._fd, -1
                    os.close(fd)
        finally:
            self._gathered = bytearray()
            super().close()


def write_file(path: str, data: bytes, sync: bool) -> None:
    """Write a small file in one system call, fsynced when `sync` (before the descriptor closes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def forget(folder: str) -> None:
    """Drop the checksums DurableFiles computed for files below `folder` that nobody took (a failed save)."""
    hashing.forget_written(folder)


# -- any writer --------------------------------------------------------------------------------


class _Watch:
    """A folder a writer writes into, and what the watcher has started writing back of it."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.since = time.monotonic()
        self.active = True
        self.files: dict[str, tuple[int, int, int]] = {}  # path -> (fd, inode, writeback started up to)

    def scan(self) -> None:
        for path, st in _regular_files(self.folder):
            if path in _open_paths:
                continue
            known = self.files.get(path)
            if known is not None and known[1] != st.st_ino:  # replaced: this descriptor is the old file
                os.close(known[0])
                known = None
            done = known[2] if known is not None else 0
            if st.st_size - done < WRITEBACK_STEP:
                continue
            if known is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    continue
                known = (fd, st.st_ino, 0)
            start_writeback(known[0], known[2], st.st_size - known[2])
            self.files[path] = (known[0], known[1], st.st_size)

    def close(self) -> None:
        for fd, _inode, _done in self.files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files.clear()


def _regular_files(folder: str) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _regular_files(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry.path, entry.stat(follow_symlinks=False)
        except OSError:
            continue


class _Watcher:
    """One thread for the process that starts the writeback of files growing in watched folders.

    Folders are watched only after `POLL` seconds, so a small save costs two set operations."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """A fresh start (also in a forked child, where the thread does not exist and a lock may be held)."""
        for watch in getattr(self, "_watches", []):
            watch.close()
        self._lock = threading.Condition()
        self._watches: list[_Watch] = []
        self._thread: threading.Thread | None = None

    def add(self, folder: str) -> _Watch:
        watch = _Watch(folder)
        with self._lock:
            self._watches.append(watch)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(target=self._run, name="checkpoint_hooks-writeback", daemon=True)
                self._thread.start()
            self._lock.notify()
        return watch

    def remove(self, watch: _Watch) -> None:
        """Stop watching; with no folder left the thread ends before this returns (no thread outlives a fit)."""
        with self._lock:
            watch.active = False  # the thread owns the descriptors and closes them
            self._lock.notify()
            idle = not any(w.active for w in self._watches)
            thread = self._thread if idle else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=IDLE_JOIN)  # a watch added meanwhile keeps it running: then stop waiting

    def _run(self) -> None:
        while True:
            with self._lock:
                for watch in [w for w in self._watches if not w.active]:
                    watch.close()
                    self._watches.remove(watch)
                if not self._watches:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return  # the next `add` starts another
                now = time.monotonic()
                due = [w for w in self._watches if w.active and now - w.since >= POLL]
            for watch in due:
                try:
                    watch.scan()
                except Exception as exc:  # a hint only: never let it stop the thread
                    log.debug("writeback of %s: %s", watch.folder, exc)
            with self._lock:
                if any(w.active for w in self._watches):
                    self._lock.wait(POLL)  # `remove` wakes it


_watcher = _Watcher() if _sync_file_range is not None else None


def _after_fork_in_child() -> None:
    global _open_lock
    _open_lock = threading.Lock()
    _disk_folders.clear()  # the parent's saves: not this process's
    if _watcher is not None:
        _watcher._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def saving_to_disk(folder: str) -> Iterator[None]:
    """While the block runs, DurableFiles below `folder` fsync before they close, and large files of
    other writers there start their writeback as they grow."""
    prefix = os.path.join(os.path.abspath(folder), "")
    with _open_lock:
        _disk_folders.append(prefix)
    watch = _watcher.add(folder) if _watcher is not None else None
    try:
        yield
    finally:
        if watch is not None and _watcher is not None:
            _watcher.remove(watch)
        with _open_lock:
            _disk_folders.remove(prefix)


@contextlib.contextmanager
def syncing(path: str) -> Iterator[None]:
    """fsync a large file on a helper thread while the block runs (its hash); raises the fsync's error."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    if size < SYNC_AHEAD_MIN:
        yield
        return
    failure: list[BaseException] = []

    def sync() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the caller: a second fsync may not see it again
            failure.append(exc)

    thread = threading.Thread(target=sync, name="checkpoint_hooks-fsync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failure:
        raise failure[0]
