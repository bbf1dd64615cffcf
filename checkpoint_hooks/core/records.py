"""Plain records of committed checkpoints, shared by retention, the manifest and the engine."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from checkpoint_hooks.core.paths import UnsafePathError, relative_path

BEST = "best"
LAST = "last"
SNAPSHOT = "snapshot"
PREEMPTED = "preempted"
MILESTONE = "milestone"
TAGS = (BEST, LAST, SNAPSHOT, MILESTONE, PREEMPTED)


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its path relative to the checkpoint directory, size and checksum."""

    path: str
    bytes: int
    checksum: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "checksum": self.checksum}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        size = int(data["bytes"])
        if size < 0:
            raise ValueError(f"file {data['path']!r} has a negative size")
        return cls(path=relative_path(data["path"], "file path"), bytes=size, checksum=data.get("checksum"))


@dataclass(frozen=True)
class Record:
    """A committed checkpoint.

    `roles` are what the record was saved for (fixed at save time); `tags` are the
    roles it still holds (retention moves them: a newer `last` takes that tag).
    """

    name: str
    epoch: int
    step: int
    format: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    roles: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    files: tuple[FileEntry, ...] = ()
    created: float = 0.0
    run: str = ""
    seq: int = 0
    mid_epoch: bool = False  # saved inside `epoch` (a step, time or preemption save), not at its end
    folder: str | None = None  # a checkpoint that is a folder of files (a sharded state): what is loaded

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def primary_path(self) -> str:
        """The path a framework loads: its folder, or the first file written (the one named after the record)."""
        if self.folder is not None:
            return self.folder
        return self.files[0].path if self.files else self.name

    def score(self, monitor: str | None) -> float | None:
        if monitor is None:
            return None
        value = self.metrics.get(monitor)
        return None if value is None else float(value)

    def with_tags(self, tags: frozenset[str]) -> Record:
        return replace(self, tags=tags)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epoch": self.epoch,
            "step": self.step,
            "format": self.format,
            "metrics": {k: encode_float(v) for k, v in self.metrics.items()},
            "roles": sorted(self.roles),
            "tags": sorted(self.tags),
            "files": [f.to_json() for f in self.files],
            "bytes": self.bytes,
            "created": self.created,
            "run": self.run,
            "seq": self.seq,
            "mid_epoch": self.mid_epoch,
            **({"folder": self.folder} if self.folder is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        name = relative_path(data["name"], "checkpoint name")
        try:
            files = tuple(FileEntry.from_json(f) for f in data.get("files") or ())
        except UnsafePathError as exc:
            raise UnsafePathError(f"checkpoint {name!r}: {exc}") from None
        return cls(
            name=name,
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            format=str(data["format"]),
            metrics={str(k): decode_float(v) for k, v in dict(data.get("metrics") or {}).items()},
            roles=frozenset(data.get("roles") or ()),
            tags=frozenset(data.get("tags") or ()),
            files=files,
            created=finite(data.get("created") or 0.0, "created"),
            run=str(data.get("run") or ""),
            seq=int(data.get("seq") or 0),
            mid_epoch=bool(data.get("mid_epoch", False)),
            folder=_folder_of(data.get("folder"), files, name),
        )


def _folder_of(folder: Any, files: tuple[FileEntry, ...], name: str) -> str | None:
    """A record's folder, checked: a safe relative path that holds every file of the record."""
    if folder is None:
        return None
    try:
        checked = relative_path(folder, "checkpoint folder")
    except UnsafePathError as exc:
        raise UnsafePathError(f"checkpoint {name!r}: {exc}") from None
    outside = [f.path for f in files if not f.path.startswith(checked + "/")]
    if outside or not files:
        raise ValueError(f"checkpoint {name!r}: its folder {checked!r} does not hold its files {outside or '(none)'}")
    return checked


def finite(value: Any, what: str) -> float:
    """`value` as a float that JSON can hold again; ValueError for NaN and infinities."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return number


def encode_float(value: float) -> float | str:
    """JSON has no NaN or infinity: write them as strings so the manifest stays strict JSON."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def decode_float(value: Any) -> float:
    if isinstance(value, str):
        return float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(value, value))
    return float(value)
