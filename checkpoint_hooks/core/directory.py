"""A checkpoint directory: its store, its manifest, and the operations on both.

Used by the engine during training and by the CLI afterwards, so that listing,
verifying, committing, pruning and repairing mean the same thing everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from checkpoint_hooks.core.errors import ManifestError
from checkpoint_hooks.core.hashing import algorithm_of, checksum_stream
from checkpoint_hooks.core.layout import index_store
from checkpoint_hooks.core.manifest import (
    COMPACT_EVERY,
    HEAD_NAME,
    JOURNAL_NAME,
    MANIFEST_NAME,
    SIDECAR_SUFFIX,
    Head,
    Manifest,
    head_bytes,
    journal_line,
    read_sidecar,
    sidecar_name,
    sidecar_paths,
)
from checkpoint_hooks.core.paths import UnsafePathError
from checkpoint_hooks.core.records import Record
from checkpoint_hooks.core.store import LocalStore, Store, open_store

log = logging.getLogger("checkpoint_hooks")


@dataclass(frozen=True)
class Problem:
    """Why one file of a committed checkpoint does not verify."""

    record: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CheckpointDirectory:
    """Checkpoint files in `store`; the index (manifest, journal, head, sidecars, lock) in `index`.

    The index lies in the directory itself, or beside it in a hidden folder (see `core.layout`):
    a directory that has one keeps it where it is; a new one takes the place `index_beside` asks for.
    """

    def __init__(self, store: Store | str, *, index_beside: bool = False) -> None:
        self.store: Store = open_store(store) if isinstance(store, str) else store
        self.index: Store = index_store(self.store, beside=index_beside)

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def index_apart(self) -> bool:
        """Whether the index lies beside the directory rather than in it."""
        return self.index is not self.store

    # -- manifest ---------------------------------------------------------------------

    def read_manifest(self) -> Manifest | None:
        """The manifest, None when the directory has none; ManifestError when it is corrupt."""
        raw = self.index.read_bytes(MANIFEST_NAME)
        if raw is None:
            return None
        journal = self.index.read_bytes(JOURNAL_NAME) if self.index.is_local else None
        return Manifest.from_bytes(raw, self.index.join(MANIFEST_NAME), journal)

    def read_head(self) -> Head | None:
        """The newest records without parsing the whole index; None when only the full index can tell.

        The head is checked against the base's checksum, so a head left behind by an
        interrupted commit, or a base written by other means, is not trusted.
        """
        if not self.index.is_local:
            return None
        raw = self.index.read_bytes(HEAD_NAME)
        base = self.index.read_bytes(MANIFEST_NAME) if raw is not None else None
        if raw is None or base is None:
            return None
        try:
            return Head(raw, base, self.index.read_bytes(JOURNAL_NAME))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError, UnicodeDecodeError) as exc:
            log.debug("not using %s (%s); reading the full index", self.index.join(HEAD_NAME), exc)
            return None

    def parse(self, head: Head) -> Manifest:
        """The full index from the bytes a head was checked against."""
        return Manifest.from_bytes(head.base, self.index.join(MANIFEST_NAME), head.journal)

    def load(self) -> Manifest:
        """The manifest, refusing to start a new one over checkpoints whose index is missing."""
        manifest = self.read_manifest()
        if manifest is not None:
            return manifest
        orphans = self.sidecars()
        if orphans:
            raise ManifestError(
                f"{self.index.join(MANIFEST_NAME)!r} is missing but {len(orphans)} checkpoint(s) are in the "
                "directory; run `checkpoint-hooks verify --repair DIR` to rebuild the index from them, "
                "or choose another dirpath"
            )
        return Manifest()

    def commit(self, manifest: Manifest) -> None:
        """Write the whole manifest atomically (and empty the journal): new records become visible."""
        if isinstance(self.index, LocalStore):
            self.index.ensure()
        manifest.commit += 1
        try:
            base = manifest.to_bytes()
            self.index.write_bytes(MANIFEST_NAME, base)
        except BaseException:
            manifest.commit -= 1
            raise
        if self.index.is_local:  # a crash before this leaves a head that no longer matches: it is ignored
            self.index.write_bytes(HEAD_NAME, head_bytes(manifest, base))
        manifest.journal_lines = 0
        manifest.history_written = len(manifest.history)
        # the base holds every change the journal had (lines numbered up to its commit are skipped)
        if self.index.is_local:
            self.index.remove(JOURNAL_NAME)

    def commit_change(self, manifest: Manifest, change: dict[str, Any]) -> Manifest:
        """Commit a change (`Manifest.change`) to `manifest`: one journal line on local disks, else a rewrite.

        Returns the index after the change; `manifest` itself is left as it was when the write fails.
        """
        if not isinstance(self.index, LocalStore) or manifest.journal_lines >= COMPACT_EVERY:
            updated = manifest.copy()
            updated.apply(change, history=False)
            updated.commit = manifest.commit
            self.commit(updated)
            return updated
        self.index.append_bytes(JOURNAL_NAME, journal_line(change))
        manifest.apply(change, history=False)
        manifest.history_written = len(manifest.history)
        return manifest

    # -- files ------------------------------------------------------------------------

    def sidecars(self) -> list[str]:
        """The sidecars of the index (each checkpoint's description), paths relative to it."""
        return sidecar_paths(self.index.list_files())

    def remove_record_files(self, record: Record) -> None:
        """Delete a record's files, its sidecar last (what repair would find)."""
        for entry in record.files:
            self.store.remove(entry.path)
        self.index.remove(sidecar_name(record.name))

    def uncommitted(self, manifest: Manifest) -> list[str]:
        """Files our saves left behind without a commit: sidecars not in the manifest and the files they list."""
        referenced = manifest.referenced_paths()
        leftovers: list[str] = []
        for path in self.sidecars():
            if path in referenced:
                continue
            leftovers.append(path)
            try:
                raw = self.index.read_bytes(path)
                record = read_sidecar(raw) if raw is not None else None
            except (ValueError, OSError) as exc:  # UnsafePathError included: only the sidecar itself goes
                log.warning("%s: %s; its files are left alone", self.index.join(path), exc)
                continue
            if record is not None:
                leftovers.extend(f.path for f in record.files if f.path not in referenced)
        return leftovers

    def clean_uncommitted(self, manifest: Manifest) -> list[str]:
        """Remove staging leftovers and uncommitted checkpoints of interrupted saves."""
        removed = self.store.cleanup_staging()
        if self.index_apart:
            removed += self.index.cleanup_staging()
        leftovers = self.uncommitted(manifest)
        # Payload first, sidecar last: an interrupted cleanup still finds the rest next time.
        for path in sorted(leftovers, key=lambda p: p.endswith(SIDECAR_SUFFIX)):
            (self.index if path.endswith(SIDECAR_SUFFIX) else self.store).remove(path)
        removed.extend(leftovers)
        if removed:
            log.info("removed %d uncommitted file(s) left by an interrupted save in %s", len(removed), self.url)
        return removed

    # -- integrity --------------------------------------------------------------------

    def verify_record(self, record: Record, checksums: bool = True) -> list[Problem]:
        """Problems with a record's files: missing, wrong size, wrong checksum. Empty when it verifies."""
        problems = []
        for entry in record.files:
            actual = None
            try:
                with self.store.open_read(entry.path) as stream:
                    # the size first: a file that grew is never read past what was recorded
                    size = stream.seek(0, 2)
                    if size == entry.bytes and checksums and entry.checksum:
                        stream.seek(0)
                        actual, size = checksum_stream(stream, algorithm_of(entry.checksum))
            except FileNotFoundError:
                problems.append(Problem(record.name, entry.path, "missing"))
                continue
            except UnsafePathError as exc:
                problems.append(Problem(record.name, entry.path, f"refused: {exc}"))
                continue
            except OSError as exc:
                problems.append(Problem(record.name, entry.path, f"unreadable ({exc.strerror or exc})"))
                continue
            if size != entry.bytes:
                problems.append(Problem(record.name, entry.path, f"size {size} bytes, expected {entry.bytes} (truncated or replaced)"))
            elif actual is not None and actual != entry.checksum:
                problems.append(Problem(record.name, entry.path, "checksum mismatch (the bytes changed after commit)"))
        return problems

    def verify(self, records: Iterable[Record] | None = None) -> list[Problem]:
        manifest = self.load()
        problems: list[Problem] = []
        for record in records if records is not None else manifest.records:
            problems.extend(self.verify_record(record))
        return problems

    # -- repair -----------------------------------------------------------------------

    def rebuild(self) -> tuple[Manifest, list[str]]:
        """A manifest rebuilt from sidecars whose files all verify; returns it and what was skipped."""
        records: list[Record] = []
        skipped: list[str] = []
        for path in self.sidecars():
            try:
                raw = self.index.read_bytes(path)
                record = read_sidecar(raw) if raw is not None else None
            except (ValueError, OSError) as exc:  # UnsafePathError included
                skipped.append(f"{path}: {exc}")
                continue
            if record is None:
                continue
            if sidecar_name(record.name) != path:
                skipped.append(f"{path}: describes another checkpoint ({record.name!r})")
                continue
            problems = self.verify_record(record)
            if problems:
                skipped.extend(f"{record.name}: {p}" for p in problems)
                continue
            records.append(record)
        records.sort(key=lambda r: r.seq)
        # Tags come from the sidecars' roles; the engine re-applies retention on its next save.
        next_seq = max((r.seq for r in records), default=0) + 1
        return Manifest(records=[r.with_tags(r.roles) for r in records], next_seq=next_seq), skipped

