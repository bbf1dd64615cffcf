"""Where a checkpoint directory keeps its index: in the directory, or beside it.

The index is `manifest.json`, its journal and head, a sidecar per checkpoint and the lock.
By default they lie in the directory next to the checkpoints. A local directory can keep
them beside it instead, in a hidden folder of the parent (`runs/.ckpt.checkpoint_hooks/`
for `runs/ckpt/`), so that the directory holds the checkpoint files alone, as the
frameworks' own callbacks leave it (Lightning's users list it, and its tests do).

Which one a directory uses is read from what is on disk: an index in the directory wins,
then one beside it; only a directory that has neither takes the place asked for. So a
directory written either way is read by the CLI and by every adapter without being told.
"""

from __future__ import annotations

import os

from checkpoint_hooks.core.lock import LOCK_NAME
from checkpoint_hooks.core.manifest import JOURNAL_NAME, MANIFEST_NAME, SIDECAR_SUFFIX
from checkpoint_hooks.core.store import LocalStore, Store

BESIDE_SUFFIX = ".checkpoint_hooks"  # runs/ckpt -> runs/.ckpt.checkpoint_hooks
_INDEX_NAMES = (MANIFEST_NAME, JOURNAL_NAME, LOCK_NAME)


def beside_path(root: str) -> str | None:
    """The hidden folder beside a local directory that holds its index; None for a filesystem root."""
    parent, name = os.path.split(os.path.normpath(root))
    if not name or name in (os.curdir, os.pardir):
        return None
    return os.path.join(parent, "." + name + BESIDE_SUFFIX)


def has_index(root: str) -> bool:
    """Whether a local folder holds an index: a manifest, its journal, a lock or a checkpoint's sidecar."""
    try:
        names = os.listdir(root)
    except OSError:
        return False
    return any(n in _INDEX_NAMES or n.endswith(SIDECAR_SUFFIX) for n in names)


def index_store(store: Store, *, beside: bool) -> Store:
    """The store the index of `store` lives in (`store` itself, or the folder beside it).

    Args:
        store: the checkpoint directory.
        beside: where a directory with no index yet keeps it (local directories only).
    """
    if not isinstance(store, LocalStore):
        return store  # a bucket's prefix has no parent folder to speak of: the index stays inside
    path = beside_path(store.root)
    if path is None or has_index(store.root):
        return store
    if not beside and not has_index(path):
        return store
    index = LocalStore(path)
    index.fsync = store.fsync
    return index
