"""An in-memory Store that records every call, for exact assertions on the engine's order of work."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from typing import IO


class FakeStore:
    is_local = False

    def __init__(self, url: str = "fake://run") -> None:
        self.url = url
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[str, ...]] = []
        self.fail_publish_after: int | None = None

    def join(self, relpath: str) -> str:
        return f"{self.url}/{relpath}"

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        path = tempfile.mkdtemp()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, staging_dir: str, relpaths: list[str], synced: Collection[str] = ()) -> None:
        for rel in relpaths:
            if self.fail_publish_after is not None:
                if self.fail_publish_after == 0:
                    raise OSError(28, "No space left on device")
                self.fail_publish_after -= 1
            with open(os.path.join(staging_dir, rel), "rb") as f:
                self.files[rel] = f.read()
            self.calls.append(("put", rel))

    def read_bytes(self, relpath: str) -> bytes | None:
        return self.files.get(relpath)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self.files[relpath] = data
        self.calls.append(("write", relpath))

    def remove(self, relpath: str) -> None:
        self.files.pop(relpath, None)
        self.calls.append(("remove", relpath))

    def list_files(self) -> list[str]:
        return sorted(self.files)

    def exists(self, relpath: str) -> bool:
        return relpath in self.files

    @contextlib.contextmanager
    def open_read(self, relpath: str) -> Iterator[IO[bytes]]:
        if relpath not in self.files:
            raise FileNotFoundError(relpath)
        yield io.BytesIO(self.files[relpath])

    @contextlib.contextmanager
    def local_path(self, relpath: str, folder: bool = False) -> Iterator[str]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, relpath)
            with open(path, "wb") as f:
                f.write(self.files[relpath])
            yield path

    def cleanup_staging(self) -> list[str]:
        return []
