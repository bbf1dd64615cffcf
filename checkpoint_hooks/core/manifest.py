"""The index of a checkpoint directory.

`manifest.json` lists every committed checkpoint (epoch, step, metrics, tags,
format, files with sizes and checksums) and the policy that wrote them. It is
replaced atomically, and a checkpoint exists for readers only once it is
listed here. Each checkpoint also has a small sidecar (`<name>.meta.json`)
with its immutable facts, so a lost manifest can be rebuilt from the files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from checkpoint_hooks.core.errors import ManifestError
from checkpoint_hooks.core.records import Record, decode_float, encode_float

MANIFEST_NAME = "manifest.json"
SIDECAR_SUFFIX = ".meta.json"
VERSION = 1


def sidecar_name(record_name: str) -> str:
    return record_name + SIDECAR_SUFFIX


@dataclass
class Manifest:
    records: list[Record] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    next_seq: int = 1
    # The monitored and other logged values of every epoch end, saved or not: {run, epoch, step, metrics}.
    history: list[dict[str, Any]] = field(default_factory=list)

    def by_name(self, name: str) -> Record | None:
        for record in self.records:
            if record.name == name:
                return record
        return None

    def by_path(self, relpath: str) -> Record | None:
        for record in self.records:
            if any(f.path == relpath for f in record.files) or record.name == relpath:
                return record
        return None

    def run_records(self, run: str) -> list[Record]:
        return sorted((r for r in self.records if r.run == run), key=lambda r: r.seq)

    def referenced_paths(self) -> set[str]:
        paths = {MANIFEST_NAME}
        for record in self.records:
            paths.add(sidecar_name(record.name))
            paths.update(f.path for f in record.files)
        return paths

    def to_bytes(self) -> bytes:
        data = {
            "format": "checkpoint_hooks.manifest",
            "version": VERSION,
            "next_seq": self.next_seq,
            "history": [
                {**h, "metrics": {k: encode_float(v) for k, v in h["metrics"].items()}} for h in self.history
            ],
            "policy": self.policy,
            "records": [r.to_json() for r in sorted(self.records, key=lambda r: r.seq)],
        }
        return json.dumps(data, indent=1, allow_nan=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, source: str) -> Manifest:
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("format") != "checkpoint_hooks.manifest":
                raise ValueError("not a checkpoint_hooks manifest")
            if int(data.get("version", 0)) > VERSION:
                raise ValueError(f"written by a newer checkpoint_hooks (manifest version {data['version']})")
            records = [Record.from_json(r) for r in data.get("records", [])]
            history = [
                {**h, "metrics": {k: decode_float(v) for k, v in dict(h.get("metrics") or {}).items()}}
                for h in data.get("history") or []
            ]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ManifestError(
                f"the manifest {source!r} is corrupt ({exc}); nothing was changed. Run "
                f"`checkpoint-hooks verify --repair DIR` to rebuild it from the checkpoint files, "
                f"or move it away to start a fresh index"
            ) from None
        next_seq = int(data.get("next_seq") or (max((r.seq for r in records), default=0) + 1))
        return cls(records=records, policy=dict(data.get("policy") or {}), next_seq=next_seq, history=history)


def sidecar_bytes(record: Record) -> bytes:
    return json.dumps(record.to_json(), indent=1, allow_nan=False).encode("utf-8")


def record_from_sidecar(raw: bytes) -> Record | None:
    try:
        return Record.from_json(json.loads(raw.decode("utf-8")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def sidecar_paths(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if p.endswith(SIDECAR_SUFFIX)]
