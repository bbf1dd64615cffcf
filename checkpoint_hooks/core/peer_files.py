"""Files of one checkpoint that other ranks upload themselves: a sharded save to a remote store.

On a remote store every rank writes its shards into a local folder of its own, so the writer's
staging folder holds only the writer's files. While it writes an item, the writer's adapter
announces the other ranks' files with `expect`: their names inside the item's folder, sizes and
checksums. The transaction records them with the item's own files, so the sidecar it publishes
first lists every file (a save interrupted later leaves files that cleanup finds). It then
publishes the writer's files and settles the announcement: `place` has the other ranks upload
theirs and report back, and the commit follows only when every upload succeeded. A save that
fails before that abandons the announcement, so that the other ranks stop waiting for it.
When `place` cannot learn how the uploads ended (a rank died, the collective broke), it raises
`OutcomeUnknown`: a rank may still be uploading, so what was published stays where the sidecar
lists it, and the next start's cleanup removes it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


class OutcomeUnknown(OSError):
    """The other ranks' uploads may still be under way: nothing the sidecar lists may be deleted now."""


@dataclass
class PeerFiles:
    """The files other ranks hold of one item, and how to have them uploaded.

    Args:
        files: (name inside the item's folder, checksum or None, size) of each file.
        place: has the other ranks upload their files; raises when any of them failed (OutcomeUnknown
            when it cannot tell).
        abandon: tells the other ranks that the save failed before their turn.
    """

    files: list[tuple[str, str | None, int]]
    place: Callable[[], None]
    abandon: Callable[[], None]
    settled: bool = field(default=False, init=False)

    def settle(self, *, placed: bool) -> None:
        """Place (or abandon) the files, once: the other ranks wait for exactly one answer."""
        if self.settled:
            return
        self.settled = True
        (self.place if placed else self.abandon)()


_expected: dict[str, PeerFiles] = {}
_lock = threading.Lock()


def expect(path: str, peers: PeerFiles) -> None:
    """Announce the other ranks' files of the item being written at `path` (a folder)."""
    with _lock:
        _expected[os.path.abspath(path)] = peers


def find(path: str) -> PeerFiles | None:
    """What `expect` announced for the item at `path`, if anything."""
    with _lock:
        return _expected.get(os.path.abspath(path))


def abandon_below(folder: str) -> None:
    """Forget the announcements of items below `folder` (a staging folder), abandoning those not settled."""
    prefix = os.path.join(os.path.abspath(folder), "")
    with _lock:
        found = [path for path in _expected if path.startswith(prefix)]
        peers = [_expected.pop(path) for path in found]
    for announced in peers:
        announced.settle(placed=False)
