"""Kill the current process (SIGKILL) at an exact phase of a save, chosen by the CH_FAULT environment variable.

CH_FAULT="phase:n" dies at the n-th time (1-based) the process reaches `phase`:
  write    a checkpoint file is half written in staging
  publish  between moving one staged file into place and the next (sidecar there, payload not)
  commit   after every file is in place, before the manifest names them
  manifest in the middle of writing the index: a half-written journal line, or a temporary
           manifest not yet renamed
  prune    after the first file of a pruned checkpoint is deleted
Only the training processes of the reliability tests install these; the library has no such hooks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from checkpoint_hooks.core import directory as directory_module
from checkpoint_hooks.core import store as store_module
from checkpoint_hooks.core import transaction as transaction_module

_counts: dict[str, int] = {}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _reached(phase: str, target: str, n: int) -> bool:
    if phase != target:
        return False
    _counts[phase] = _counts.get(phase, 0) + 1
    return _counts[phase] == n


def install(spec: str | None = None) -> None:
    spec = spec if spec is not None else os.environ.get("CH_FAULT", "")
    if not spec:
        return
    target, _, count = spec.partition(":")
    n = int(count or 1)

    original_take_written: Callable[..., Any] = transaction_module.take_written

    def take_written(path: str, *args: Any, **kwargs: Any) -> Any:  # the engine's first look at each written file
        if _reached("write", target, n):
            size = os.path.getsize(path)
            os.truncate(path, size // 2)
            _die()
        return original_take_written(path, *args, **kwargs)

    transaction_module.take_written = take_written  # type: ignore[assignment]

    original_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_replace(src, dst, *args, **kwargs)
        if str(dst).endswith(".meta.json") and _reached("publish", target, n):
            _die()
        return result

    store_module.os.replace = replace  # type: ignore[attr-defined]

    original_put = store_module.FsspecStore.publish

    def put(self: Any, staging_dir: str, relpaths: list[str], synced: Any = ()) -> None:
        if target == "publish" and len(relpaths) > 1:
            original_put(self, staging_dir, relpaths[:1], synced)
            if _reached("publish", target, n):
                _die()
            original_put(self, staging_dir, relpaths[1:], synced)
            return
        original_put(self, staging_dir, relpaths, synced)

    store_module.FsspecStore.publish = put  # type: ignore[method-assign]

    original_commit = directory_module.CheckpointDirectory.commit

    def commit(self: Any, manifest: Any) -> None:
        if manifest.records and _reached("commit", target, n):
            _die()
        if manifest.records and self.store.is_local and _reached("manifest", target, n):
            # the temporary file a replace would have renamed, half written
            with open(os.path.join(self.store.root, store_module.STAGING_PREFIX + "manifest"), "wb") as f:
                f.write(manifest.to_bytes()[:50])
            _die()
        original_commit(self, manifest)

    directory_module.CheckpointDirectory.commit = commit  # type: ignore[method-assign]

    original_change = directory_module.CheckpointDirectory.commit_change

    def commit_change(self: Any, manifest: Any, change: Any) -> Any:
        if change["add"] and _reached("commit", target, n):
            _die()
        if change["add"] and self.store.is_local and _reached("manifest", target, n):
            line = directory_module.journal_line(change)
            self.store.append_bytes(directory_module.JOURNAL_NAME, line[: len(line) // 2])
            _die()
        return original_change(self, manifest, change)

    directory_module.CheckpointDirectory.commit_change = commit_change  # type: ignore[method-assign]

    original_remove = directory_module.CheckpointDirectory.remove_record_files

    def remove_record_files(self: Any, record: Any) -> None:
        if _reached("prune", target, n):
            self.store.remove(record.files[0].path)
            _die()
        original_remove(self, record)

    directory_module.CheckpointDirectory.remove_record_files = remove_record_files  # type: ignore[method-assign]
