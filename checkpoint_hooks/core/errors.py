"""Errors raised by the framework-free core."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class of every checkpoint_hooks runtime error."""


class ManifestError(CheckpointError):
    """The manifest of a checkpoint directory cannot be read or parsed."""


class LockError(CheckpointError):
    """Another live process writes the same checkpoint directory."""


class SaveError(CheckpointError):
    """A checkpoint could not be written; nothing of it was committed."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint file is missing, truncated or does not match its checksum."""


class MonitorError(CheckpointError, KeyError):
    """The monitored metric does not appear in the logged metrics."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
