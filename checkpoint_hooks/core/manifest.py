"""The index of a checkpoint directory.

`manifest.json` lists every committed checkpoint (epoch, step, metrics, tags,
format, files with sizes and checksums) and the policy that wrote them. It is
replaced atomically, and a checkpoint exists for readers only once it is
listed here. Each checkpoint also has a small sidecar (`<name>.meta.json`)
with its immutable facts, so a lost manifest can be rebuilt from the files.

On local disks an epoch's commit appends one line to `manifest.journal`
instead of rewriting the whole index (a few hundred bytes instead of megabytes
for long runs). Each line is a change, numbered and checksummed: readers apply
the complete lines after the base's number and ignore a torn last line, which is
what a crash in the middle of an append leaves (that commit did not happen).
The base is rewritten, and the journal emptied, at fit start and every
`COMPACT_EVERY` lines.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

from checkpoint_hooks.core.errors import ManifestError
from checkpoint_hooks.core.paths import UnsafePathError
from checkpoint_hooks.core.records import Record, decode_float, encode_float
from checkpoint_hooks.policy import short_repr

log = logging.getLogger("checkpoint_hooks")

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "manifest.journal"
HEAD_NAME = "manifest.head"
HEAD_NEWEST = 3  # records of each format the head lists, newest first
SIDECAR_SUFFIX = ".meta.json"
VERSION = 1
COMPACT_EVERY = 500


def sidecar_name(record_name: str) -> str:
    return record_name + SIDECAR_SUFFIX


class Manifest:
    """The committed records of a directory, indexed by name and by (run, tag) for the engine's hot path.

    An epoch end touches only the records whose tags change, so committing is
    independent of how many checkpoints a long run has accumulated. A background save
    changes the index in place while the training thread may read it: a lock keeps
    each read and each change whole.
    """

    def __init__(
        self,
        records: Iterable[Record] = (),
        policy: dict[str, Any] | None = None,
        next_seq: int = 1,
        history: list[dict[str, Any]] | None = None,
        commit: int = 0,
        journal_lines: int = 0,
        history_written: int = 0,
    ) -> None:
        self._lock = threading.RLock()
        self._by_name: dict[str, Record] = {}
        self._tagged: dict[tuple[str, str], dict[str, Record]] = {}
        self.records = list(records)
        self.policy: dict[str, Any] = dict(policy or {})
        self.next_seq = next_seq
        # The monitored and other logged values of every epoch end, saved or not: {run, epoch, step, metrics}.
        self.history: list[dict[str, Any]] = history if history is not None else []
        self.commit = commit  # number of the last commit this index holds (base or journal line)
        self.journal_lines = journal_lines  # journal lines applied on top of the base
        self.history_written = history_written  # history entries already in the base or the journal

    # -- records ----------------------------------------------------------------------

    @property
    def records(self) -> list[Record]:
        """Every record, in save order."""
        with self._lock:
            return list(self._by_name.values())

    @records.setter
    def records(self, records: Iterable[Record]) -> None:
        with self._lock:
            self._by_name.clear()
            self._tagged.clear()
            for record in sorted(records, key=lambda r: r.seq):
                self.put(record)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def put(self, record: Record) -> None:
        """Add a record, or replace the one of the same name (its place in save order stays)."""
        with self._lock:
            self.discard(record.name, keep_place=True)
            self._by_name[record.name] = record
            for tag in record.tags:
                self._tagged.setdefault((record.run, tag), {})[record.name] = record

    def discard(self, name: str, keep_place: bool = False) -> None:
        with self._lock:
            old = self._by_name.get(name)
            if old is None:
                return
            for tag in old.tags:
                self._tagged.get((old.run, tag), {}).pop(name, None)
            if not keep_place:
                del self._by_name[name]

    def by_name(self, name: str) -> Record | None:
        return self._by_name.get(name)

    def run_records(self, run: str) -> list[Record]:
        return sorted((r for r in self.records if r.run == run), key=lambda r: r.seq)

    def holders(self, run: str, tag: str) -> list[Record]:
        """The records of `run` that hold `tag`, in save order (without looking at the others)."""
        with self._lock:
            found = list(self._tagged.get((run, tag), {}).values())
        return sorted(found, key=lambda r: r.seq)

    def referenced_paths(self) -> set[str]:
        paths = {MANIFEST_NAME, JOURNAL_NAME, HEAD_NAME}
        for record in self.records:
            paths.add(sidecar_name(record.name))
            paths.update(f.path for f in record.files)
        return paths

    def copy(self) -> Manifest:
        return Manifest(
            self.records,
            self.policy,
            self.next_seq,
            list(self.history),
            self.commit,
            self.journal_lines,
            self.history_written,
        )

    # -- bytes ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        data = {
            "format": "checkpoint_hooks.manifest",
            "version": VERSION,
            "commit": self.commit,
            "next_seq": self.next_seq,
            "policy": self.policy,
            "records": [r.to_json() for r in sorted(self.records, key=lambda r: r.seq)],
            "history": [_encode_history(h) for h in self.history],
        }
        # compact: the C encoder (an indented dump is several times slower on long runs)
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, source: str, journal: bytes | None = None) -> Manifest:
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("format") != "checkpoint_hooks.manifest":
                raise ValueError("not a checkpoint_hooks manifest")
            if int(data.get("version", 0)) > VERSION:
                raise ValueError(f"written by a newer checkpoint_hooks (manifest version {data['version']})")
            records = [Record.from_json(r) for r in data.get("records", [])]
            history = [_decode_history(h) for h in data.get("history") or []]
            changes = read_journal(journal, _journal_of(source)) if journal else []
            next_seq = int(data.get("next_seq") or (max((r.seq for r in records), default=0) + 1))
            manifest = cls(
                records=records,
                policy=dict(data.get("policy") or {}),
                next_seq=next_seq,
                history=history,
                commit=int(data.get("commit") or 0),
            )
            for change in changes:
                if change["commit"] > manifest.commit:
                    manifest.apply(change)
        except UnsafePathError as exc:
            raise ManifestError(
                f"the index {source!r} names a path that is not a plain file inside the directory ({exc}); "
                "refusing to use it: nothing was read or deleted. If the directory comes from someone else, "
                "do not train into it; `checkpoint-hooks verify --repair DIR` rebuilds the index from the "
                "checkpoints' own sidecars, skipping what is unsafe"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError, UnicodeDecodeError) as exc:
            raise ManifestError(
                f"the manifest {source!r} is corrupt ({short_repr(str(exc))}); nothing was changed. Run "
                f"`checkpoint-hooks verify --repair DIR` to rebuild it from the checkpoint files, "
                f"or move it away to start a fresh index"
            ) from None
        manifest.history_written = len(manifest.history)
        return manifest

    # -- changes ----------------------------------------------------------------------

    def change(
        self,
        add: Iterable[Record] = (),
        drop: Iterable[str] = (),
        tags: Mapping[str, frozenset[str]] | None = None,
        next_seq: int | None = None,
        policy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The journal entry of the next commit: records added, dropped and retagged, and the unwritten history."""
        change: dict[str, Any] = {
            "commit": self.commit + 1,
            "add": [r.to_json() for r in add],
            "drop": list(drop),
            "tags": {name: sorted(t) for name, t in (tags or {}).items()},
            "next_seq": next_seq if next_seq is not None else self.next_seq,
            "history": [_encode_history(h) for h in self.history[self.history_written :]],
        }
        if policy is not None and policy != self.policy:
            change["policy"] = policy
        return change

    def apply(self, change: dict[str, Any], history: bool = True) -> None:
        """Apply a journal entry (`history=False` when this index already holds its history entries)."""
        added = [Record.from_json(data) for data in change.get("add") or ()]
        with self._lock:  # readers on another thread see the index before or after, not between
            for name in change.get("drop") or ():
                self.discard(name)
            for name, tags in (change.get("tags") or {}).items():
                record = self._by_name.get(name)
                if record is not None:
                    self.put(record.with_tags(frozenset(tags)))
            for record in added:
                self.put(record)
        self.next_seq = int(change.get("next_seq") or self.next_seq)
        if history:
            self.history.extend(_decode_history(h) for h in change.get("history") or ())
        if "policy" in change:
            self.policy = dict(change["policy"])
        self.commit = int(change["commit"])
        self.journal_lines += 1


def head_bytes(manifest: Manifest, base: bytes) -> bytes:
    """The head written beside a base: the newest records of each format, and the checksum of that base.

    Finding where to resume then reads this small file, the journal and the base's bytes
    (to check they are the ones the head describes), without parsing a long run's index.
    """
    by_format: dict[str, list[Record]] = {}
    for record in manifest.records:
        by_format.setdefault(record.format, []).append(record)
    newest: list[Record] = []
    more: list[str] = []
    for fmt, records in by_format.items():
        records.sort(key=lambda r: -r.seq)
        newest.extend(records[:HEAD_NEWEST])
        if len(records) > HEAD_NEWEST:
            more.append(fmt)
    data = {
        "format": "checkpoint_hooks.head",
        "version": VERSION,
        "base": xxhash.xxh3_64_hexdigest(base),
        "commit": manifest.commit,
        "policy": manifest.policy,
        "newest": [r.to_json() for r in sorted(newest, key=lambda r: -r.seq)],
        "more": sorted(more),
    }
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")


class Head:
    """What the head and the journal say about the newest records, checked against the base's bytes.

    `records` are newest first; a format in `more` has older records that only the full index lists.
    `base` and `journal` are the bytes read, for parsing the full index without reading them again.
    """

    def __init__(self, raw: bytes, base: bytes, journal: bytes | None) -> None:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or data.get("format") != "checkpoint_hooks.head":
            raise ValueError("not a checkpoint_hooks head")
        if int(data.get("version", 0)) > VERSION or data.get("base") != xxhash.xxh3_64_hexdigest(base):
            raise ValueError("the head describes another base")
        self.base, self.journal = base, journal
        self.more = frozenset(data.get("more") or ())
        # the journal's changes applied to the listed records, as to the full index
        newest = Manifest((Record.from_json(r) for r in data.get("newest") or ()), commit=int(data.get("commit") or 0))
        for change in read_journal(journal, None) if journal else []:
            if change["commit"] > newest.commit:
                newest.apply(change)
        self.journal_lines = newest.journal_lines
        self.records = sorted(newest.records, key=lambda r: -r.seq)


def journal_line(change: dict[str, Any]) -> bytes:
    """One journal line: the checksum of the change, then the change (compact JSON)."""
    body = json.dumps(change, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return xxhash.xxh3_64_hexdigest(body).encode() + b" " + body + b"\n"


def _journal_of(manifest_path: str) -> str:
    return manifest_path[: -len(MANIFEST_NAME)] + JOURNAL_NAME if manifest_path.endswith(MANIFEST_NAME) else JOURNAL_NAME


def read_journal(raw: bytes, source: str | None) -> list[dict[str, Any]]:
    """The changes of a journal, in order.

    What follows the last newline is a torn append (a crash, or a full disk, during that
    commit, so it did not happen): it is dropped with a warning, as a database drops a torn
    log tail (`source`, the journal's path for that warning; None: no warning). A complete line that fails its checksum is damage, not a crash: ValueError,
    so that no later commit is silently dropped.
    """
    changes = []
    lines = raw.split(b"\n")
    if lines[-1] and source is not None:
        log.warning(
            "%s ends with an incomplete line (%d bytes) left by an interrupted commit; it is ignored",
            source,
            len(lines[-1]),
        )
    for number, line in enumerate(lines[:-1], start=1):
        digest, _, body = line.partition(b" ")
        try:
            if xxhash.xxh3_64_hexdigest(body).encode() != digest:
                raise ValueError("checksum mismatch")
            change = json.loads(body.decode("utf-8"))
            if not isinstance(change, dict) or not isinstance(change.get("commit"), int):
                raise ValueError("not a change")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"{JOURNAL_NAME} line {number} is damaged ({exc})") from None
        changes.append(change)
    return changes


def _encode_history(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "metrics": {k: encode_float(v) for k, v in entry["metrics"].items()}}


def _decode_history(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "metrics": {k: decode_float(v) for k, v in dict(entry.get("metrics") or {}).items()}}


def sidecar_bytes(record: Record) -> bytes:
    return json.dumps(record.to_json(), separators=(",", ":"), allow_nan=False).encode("utf-8")


def read_sidecar(raw: bytes) -> Record:
    """The record a sidecar describes; ValueError (UnsafePathError for paths that leave the directory) saying why not."""
    try:
        return Record.from_json(json.loads(raw.decode("utf-8")))
    except UnsafePathError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable sidecar ({short_repr(str(exc))})") from None


def record_from_sidecar(raw: bytes) -> Record | None:
    try:
        return read_sidecar(raw)
    except ValueError:
        return None


def sidecar_paths(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if p.endswith(SIDECAR_SUFFIX)]
