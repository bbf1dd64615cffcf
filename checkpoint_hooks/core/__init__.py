"""The framework-free core: retention, manifest, store and the engine. Imports no training framework."""

from checkpoint_hooks.core.directory import CheckpointDirectory, Problem
from checkpoint_hooks.core.engine import Engine
from checkpoint_hooks.core.errors import (
    CheckpointError,
    CorruptCheckpointError,
    LockError,
    ManifestError,
    MonitorError,
    SaveError,
)
from checkpoint_hooks.core.planner import Plan, SaveItem
from checkpoint_hooks.core.records import FileEntry, Record
from checkpoint_hooks.core.store import FsspecStore, LocalStore, open_store

__all__ = [
    "CheckpointDirectory",
    "CheckpointError",
    "CorruptCheckpointError",
    "Engine",
    "FileEntry",
    "FsspecStore",
    "LocalStore",
    "LockError",
    "ManifestError",
    "MonitorError",
    "Plan",
    "Problem",
    "Record",
    "SaveError",
    "SaveItem",
    "open_store",
]
