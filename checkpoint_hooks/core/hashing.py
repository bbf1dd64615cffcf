"""File checksums: xxh3-128 (about 9 GiB/s here, several times faster than sha256), named in the value."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import IO, Any

import xxhash

CHUNK = 8 * 1024 * 1024
ALGORITHM = "xxh3_128"

_local = threading.local()

_FACTORIES: dict[str, Callable[[], Any]] = {
    "xxh3_128": xxhash.xxh3_128,
    "xxh3_64": xxhash.xxh3_64,
    "sha256": hashlib.sha256,
}


def new_hasher(algorithm: str = ALGORITHM) -> Any:
    try:
        return _FACTORIES[algorithm]()
    except KeyError:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(_FACTORIES)}") from None


def _buffer() -> memoryview:
    """A read buffer reused by this thread (the background saver hashes beside the training thread)."""
    view: memoryview | None = getattr(_local, "buffer", None)
    if view is None:
        view = _local.buffer = memoryview(bytearray(CHUNK))
    return view


def checksum_stream(stream: IO[bytes], algorithm: str = ALGORITHM) -> tuple[str, int]:
    """The checksum ("algorithm:hex") and the byte count of everything left in `stream`."""
    hasher = new_hasher(algorithm)
    total = 0
    readinto = getattr(stream, "readinto", None)
    view = _buffer() if readinto is not None else None
    while True:
        if readinto is not None and view is not None:
            n = readinto(view)
            if not n:
                break
            hasher.update(view[:n])
        else:
            chunk = stream.read(CHUNK)
            if not chunk:
                break
            n = len(chunk)
            hasher.update(chunk)
        total += n
    return f"{algorithm}:{hasher.hexdigest()}", total


def checksum_file(path: str, algorithm: str = ALGORITHM) -> tuple[str, int]:
    with open(path, "rb", buffering=0) as stream:
        return checksum_stream(stream, algorithm)


def algorithm_of(checksum: str) -> str:
    return checksum.split(":", 1)[0] if ":" in checksum else ALGORITHM
