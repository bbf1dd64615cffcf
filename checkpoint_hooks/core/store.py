"""Where checkpoint bytes go: a local directory or any fsspec URL.

The seam is small (stage, publish, read, write, remove, list). Atomicity lives
inside: frameworks write into a staging directory; `publish` moves the files
into place (rename on a local disk, one upload per file on an object store).
A checkpoint is visible only once the manifest, written last, records it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator
from typing import IO, Protocol

from checkpoint_hooks.core import scratch
from checkpoint_hooks.core.paths import UnsafePathError, open_regular, relative_path, within

STAGING_PREFIX = ".staging-"


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Store(Protocol):
    """What the engine needs from a checkpoint directory."""

    url: str
    is_local: bool

    def staging(self) -> contextlib.AbstractContextManager[str]:
        """A local directory to write a checkpoint into; removed on exit whatever happens."""

    def publish(self, staging_dir: str, relpaths: list[str], synced: Collection[str] = ()) -> None:
        """Move staged files to their final relative paths (atomically each).

        `synced` names those of `relpaths` their writer already fsynced, unchanged since.
        """

    def read_bytes(self, relpath: str) -> bytes | None:
        """A file's bytes, or None when it does not exist."""

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Replace a file atomically: readers see the old or the new bytes, never a mix."""

    def remove(self, relpath: str) -> None:
        """Delete a file; missing files are fine."""

    def list_files(self) -> list[str]:
        """Every file below the directory, relative, '/'-separated."""

    def exists(self, relpath: str) -> bool: ...

    def open_read(self, relpath: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    def local_path(self, relpath: str, folder: bool = False) -> contextlib.AbstractContextManager[str]:
        """A local path a framework can load from (a download for remote stores); `folder`: a folder of files."""

    def join(self, relpath: str) -> str:
        """The full path or URL of a relative path, as shown to users."""

    def cleanup_staging(self) -> list[str]:
        """Remove staging leftovers of interrupted saves; returns what was removed."""


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_staging(path: str) -> None:
    """Remove a staging folder: one rmdir after a publish (the engine removes each item's folder), else a walk."""
    try:
        os.rmdir(path)
    except OSError:  # something left: a failed save, or files written ahead and moved out of their folders
        shutil.rmtree(path, ignore_errors=True)


class LocalStore:
    """A directory on a local (or mounted) filesystem: temp name, fsync, rename."""

    is_local = True

    def __init__(self, path: str) -> None:
        if path.startswith("file://"):
            path = path[len("file://") :]
        self.root = os.path.abspath(os.path.expanduser(path))
        self.url = self.root
        self._real_root = os.path.realpath(self.root)  # what every path used must stay inside
        # False (the policy's `fsync: false`): nothing is flushed; renames still publish only whole files
        self.fsync = True
        self._appended: set[str] = set()  # files append_bytes wrote to (and fsynced the folder of, if it made them)
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(
                errno.ENOTDIR,
                f"dirpath {self.root!r} is a file, not a directory; point dirpath at a directory",
                self.root,
            )

    def _abs(self, relpath: str) -> str:
        """The full path of `relpath`, refused (UnsafePathError) when it would lead outside the directory."""
        target = os.path.join(self.root, *relative_path(relpath).split("/"))
        folder = os.path.dirname(target)
        # resolved at every use: a folder of the path (dirpath's own included) swapped for a link meanwhile
        if not within(self._real_root, os.path.realpath(folder)):
            raise UnsafePathError(
                f"{relpath!r} leads outside {self.root!r} (a symbolic link on its way points elsewhere); "
                "nothing was read, written or deleted for it"
            )
        return target

    def join(self, relpath: str) -> str:
        return os.path.join(self.root, *relpath.split("/"))

    def ensure(self) -> None:
        if not os.path.isdir(self.root):  # one stat in the usual case; makedirs makes three calls
            os.makedirs(self.root, exist_ok=True)

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        self.ensure()
        # Same directory as the destination, so publishing is a rename on one filesystem.
        path = os.path.join(self.root, STAGING_PREFIX + uuid.uuid4().hex[:12])
        os.mkdir(path)
        try:
            yield path
        finally:
            _remove_staging(path)

    def publish(self, staging_dir: str, relpaths: list[str], synced: Collection[str] = ()) -> None:
        directories = {self.root}
        for rel in relpaths:
            if rel not in synced and self.fsync:
                _fsync_path(os.path.join(staging_dir, *rel.split("/")))
        for rel in relpaths:
            target = self._abs(rel)
            parent = os.path.dirname(target)
            if parent not in directories:
                os.makedirs(parent, exist_ok=True)
                directories.add(parent)
            os.replace(os.path.join(staging_dir, *rel.split("/")), target)
        for directory in directories if self.fsync else ():
            _fsync_path(directory, directory=True)

    def read_bytes(self, relpath: str) -> bytes | None:
        try:
            fd = open_regular(self._abs(relpath))
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            return f.read()

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self.ensure()
        target = self._abs(relpath)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=STAGING_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            _fsync_path(os.path.dirname(target), directory=True)

    def append_bytes(self, relpath: str, data: bytes) -> None:
        """Append and fsync: after a crash the file ends with all of `data`, a part of it, or none."""
        path = self._abs(relpath)
        flags = os.O_WRONLY | os.O_APPEND
        fd = -1
        if path in self._appended:  # appended to before: opened without a look first
            with contextlib.suppress(FileNotFoundError):
                fd = open_regular(path, flags)
        created = False
        if fd < 0:
            self.ensure()
            created = not os.path.exists(path)
            fd = open_regular(path, flags | os.O_CREAT)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if st.st_nlink > 1:
                raise UnsafePathError(f"{path!r} has other hard links; refusing to append to a file shared with others")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                # a partial line (a full disk) is taken back, so the next append does not extend it
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created and self.fsync:
            _fsync_path(os.path.dirname(path), directory=True)
        self._appended.add(path)

    def remove(self, relpath: str) -> None:
        path = self._abs(relpath)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError:
            if not (os.path.isdir(path) and not os.path.islink(path)):
                raise
            shutil.rmtree(path)
        # Drop directories the checkpoint created (e.g. an export folder's parents), never the root.
        parent = os.path.dirname(path)
        while parent != self.root and parent.startswith(self.root):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)

    def list_files(self) -> list[str]:
        found: list[str] = []
        if not os.path.isdir(self.root):
            return found
        try:
            for base, _dirs, files in os.walk(self.root):
                for name in files:
                    rel = os.path.relpath(os.path.join(base, name), self.root)
                    found.append(rel.replace(os.sep, "/"))
        except RecursionError:
            raise UnsafePathError(f"{self.root!r} holds folders nested too deep to walk; move them out") from None
        return sorted(found)

    def exists(self, relpath: str) -> bool:
        return os.path.exists(self._abs(relpath))

    @contextlib.contextmanager
    def open_read(self, relpath: str) -> Iterator[IO[bytes]]:
        with open(open_regular(self._abs(relpath)), "rb", buffering=0) as f:
            yield f

    @contextlib.contextmanager
    def local_path(self, relpath: str, folder: bool = False) -> Iterator[str]:
        path = self._abs(relpath)
        if folder:  # a folder of files (a sharded state): a real folder here, not a link to one
            if os.path.islink(path) or not os.path.isdir(path):
                raise UnsafePathError(f"{path!r} is not a folder (a link, a file, or nothing)")
        else:
            # what a framework loads: a regular file here, not a link, a FIFO (a load would wait forever) or a device
            os.close(open_regular(path))
        yield path

    def cleanup_staging(self) -> list[str]:
        removed: list[str] = []
        if not os.path.isdir(self.root):
            return removed
        for name in os.listdir(self.root):
            if name.startswith(STAGING_PREFIX):
                path = os.path.join(self.root, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    try:
                        shutil.rmtree(path, ignore_errors=True)
                    except RecursionError:  # nested too deep to remove: left, and said
                        raise UnsafePathError(f"{path!r} holds folders nested too deep to remove; remove it") from None
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                removed.append(name)
        return removed


class FsspecStore:
    """Any fsspec URL (s3://, gs://, memory://). Object stores have no rename:
    each file is one upload, and the manifest written last is the commit."""

    is_local = False

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        if self.fs.isfile(self.root):
            raise NotADirectoryError(
                errno.ENOTDIR, f"dirpath {url!r} is a file, not a directory; point dirpath at a directory", url
            )

    def _abs(self, relpath: str) -> str:
        return f"{self.root}/{relative_path(relpath)}"

    def join(self, relpath: str) -> str:
        return f"{self.url}/{relpath}"

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        with scratch.temporary("staging") as path:
            yield path

    def publish(self, staging_dir: str, relpaths: list[str], synced: Collection[str] = ()) -> None:
        for rel in relpaths:
            self.fs.put_file(os.path.join(staging_dir, *rel.split("/")), self._abs(rel))

    def read_bytes(self, relpath: str) -> bytes | None:
        try:
            data = self.fs.cat_file(self._abs(relpath))
        except FileNotFoundError:
            return None
        return bytes(data)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self.fs.pipe_file(self._abs(relpath), data)

    def remove(self, relpath: str) -> None:
        path = self._abs(relpath)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def list_files(self) -> list[str]:
        try:
            paths = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        prefix = self.root + "/"
        return sorted(p[len(prefix) :] for p in paths if p.startswith(prefix))

    def exists(self, relpath: str) -> bool:
        return bool(self.fs.exists(self._abs(relpath)))

    @contextlib.contextmanager
    def open_read(self, relpath: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self._abs(relpath), "rb") as f:
            yield f

    @contextlib.contextmanager
    def local_path(self, relpath: str, folder: bool = False) -> Iterator[str]:  # `get` copies a folder too
        with scratch.temporary("download") as tmp:
            target = os.path.join(tmp, *relpath.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.get(self._abs(relpath), target, recursive=True)
            yield target

    def cleanup_staging(self) -> list[str]:
        return []  # staging is local and temporary; uncommitted uploads are found through the manifest


def open_store(dirpath: str) -> LocalStore | FsspecStore:
    """The store for a local path or an fsspec URL."""
    return FsspecStore(dirpath) if is_url(dirpath) else LocalStore(dirpath)
