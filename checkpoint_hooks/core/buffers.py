"""Host arrays that background saves copy a state into, kept from one save to the next.

A fresh copy of a large state pays a page fault for every page it fills, each save; an
array filled before does not. `Engine.execute_async(..., buffers)` waits for the save in
flight, then calls `recycle()` before the next snapshot: every array handed out is free
again. Its `close()` lets them go. The arrays are whatever `allocate` makes (numpy or
torch); adapters copy into them with their framework's means.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

A = TypeVar("A")

# Smaller copies come from memory the allocator has already touched: not worth keeping.
REUSE_MIN_BYTES = 1024 * 1024


class HostBuffers(Generic[A]):
    """Arrays by shape and type: taken for one save, free again at the next `recycle()`.

    Args:
        allocate: makes a new array of a shape and type, e.g. `numpy.empty`.
    """

    def __init__(self, allocate: Callable[[tuple[int, ...], Any], A]) -> None:
        self._allocate = allocate
        self._free: dict[tuple[tuple[int, ...], Hashable], list[A]] = {}
        self._used: list[tuple[tuple[tuple[int, ...], Hashable], A]] = []

    def take(self, shape: tuple[int, ...], dtype: Hashable) -> A:
        """An array of that shape and type: one an earlier save used, or a new one."""
        key = (tuple(shape), dtype)
        free = self._free.get(key)
        array = free.pop() if free else self._allocate(key[0], dtype)
        self._used.append((key, array))
        return array

    def recycle(self) -> None:
        """Every array taken is free again: the save that held them is over."""
        for key, array in self._used:
            self._free.setdefault(key, []).append(array)
        self._used = []

    def clear(self) -> None:
        """Let go of every array (the end of a fit)."""
        self._free.clear()
        self._used = []
