"""One save as a transaction: write into staging, publish, commit the manifest, and only then prune.

The order is the safety rule of the whole library (DESIGN.md, rules 1 and 2): nothing is
visible before the commit that names it, and nothing retention drops is deleted before
that commit succeeded. A failure at any step before the commit takes back what this save
put in place and leaves earlier checkpoints as they were. The transaction does not care
on which thread it runs: the executor runs it on the training thread or in its worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Protocol

from checkpoint_hooks.core import durable, peer_files, retention
from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.errors import SaveError
from checkpoint_hooks.core.hashing import checksum_file, take_written
from checkpoint_hooks.core.manifest import Manifest, sidecar_bytes, sidecar_name
from checkpoint_hooks.core.planner import Plan, SaveItem, Writer
from checkpoint_hooks.core.records import BEST, LAST, MILESTONE, PREEMPTED, SNAPSHOT, FileEntry, Record
from checkpoint_hooks.core.store import Store
from checkpoint_hooks.policy import CheckpointPolicy

log = logging.getLogger("checkpoint_hooks")


class CurrentItem:
    """The item being written or snapshotted right now, on whichever thread.

    A framework's state_dict hooks ask the engine which record their state becomes.
    """

    def __init__(self) -> None:
        self.item: SaveItem | None = None

    @contextlib.contextmanager
    def writing(self, item: SaveItem) -> Iterator[None]:
        self.item = item
        try:
            yield
        finally:
            self.item = None


def stage_item(stage: str, index: int, item: SaveItem, write: Writer, current: CurrentItem, to_disk: bool) -> str:
    """Write `item` into a folder of its own in the staging folder `stage`; returns that folder.

    Args:
        stage: the save's staging folder.
        index: the item's place in its plan (the folder's name).
        item: what to write.
        write: the adapter's writer.
        current: told which item is being written.
        to_disk: let the DurableFiles the writer opens fsync as they close (local stores).
    """
    folder = os.path.join(stage, str(index))
    os.mkdir(folder)
    # DurableFiles fsync as they close; the disk starts writing what other writers write
    with current.writing(item), durable.saving_to_disk(folder) if to_disk else contextlib.nullcontext():
        write(item, os.path.join(folder, item.filename))
    return folder


class SaveHost(Protocol):
    """What a save reads from the engine at each call, and the index it replaces after its commit."""

    @property
    def policy(self) -> CheckpointPolicy: ...
    @property
    def store(self) -> Store | None: ...
    @property
    def directory(self) -> CheckpointDirectory: ...
    @property
    def run(self) -> str: ...
    @property
    def epoch_base(self) -> int: ...
    @property
    def level(self) -> int: ...
    @property
    def manifest(self) -> Manifest: ...
    @manifest.setter
    def manifest(self, manifest: Manifest) -> None: ...
    def run_records(self) -> list[Record]: ...
    def top_k_records(self) -> list[Record]: ...
    def path_of(self, record: Record) -> str: ...


class Transaction:
    """Writes, publishes, commits and prunes the items of one plan.

    Args:
        host: the engine whose directory, index and run the save goes into.
        current: told which item is being written.
    """

    def __init__(self, host: SaveHost, current: CurrentItem) -> None:
        self._host = host
        self._current = current
        # Whether retention has run over the whole run with this policy (see `candidates`); the
        # engine sets it when a run starts or resumes.
        self.retained_in_full = False
        # A save failed while other ranks may still have been uploading its files (peer_files.OutcomeUnknown).
        self.unsettled = False

    def save(self, plan: Plan, write: Writer, committed: Callable[[], None]) -> list[Record]:
        """Save `plan` here and now; returns the committed records ([] after a failure that only warns).

        Args:
            plan: what to save.
            write: the adapter's writer, `write(item, path)`.
            committed: called once the commit succeeded, before pruning (the triggers count from there).
        """
        started = time.perf_counter()
        records: list[Record] = []
        try:
            records = self.write(plan, write)
            removed = self.commit(records)
        except Exception as exc:
            self.discard(records)
            self.unsettled = self.unsettled or isinstance(exc, peer_files.OutcomeUnknown)
            self.fail(plan, exc)
            return []
        committed()
        self._log_save(records, time.perf_counter() - started)
        self.prune(removed)
        return records

    def fail(self, plan: Plan, exc: Exception) -> None:
        """A failed save: raise it as SaveError, or only warn with on_save_error='warn'."""
        error = self.error(plan, exc)
        if self._host.policy.on_save_error == "warn":
            log.warning("%s; training goes on (on_save_error='warn')", error)
            return
        raise error from exc

    def discard(self, records: Sequence[Record]) -> None:
        """Remove what a failed save published without a commit (the next start would, too)."""
        for record in records:
            try:
                self._host.directory.remove_record_files(record)
            except Exception:  # the failure that got us here may stop this as well
                pass

    def error(self, plan: Plan, exc: Exception) -> SaveError:
        """`exc` as the SaveError a user reads: what, where, why, and that nothing was lost."""
        if isinstance(exc, SaveError):
            return exc
        host = self._host
        names = ", ".join(i.filename for i in plan.items)
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        needed = ""
        previous = host.manifest.holders(host.run, LAST) or host.run_records()
        if previous:
            needed = f" (the previous save took {previous[-1].bytes} bytes)"
        where = host.directory.url
        return SaveError(
            f"could not save {names} to {where} at epoch {plan.epoch}: {reason}{needed}; "
            "nothing of it was committed and earlier checkpoints are intact"
        )

    def write(self, plan: Plan, write: Writer) -> list[Record]:
        """Write every item into staging, describe it in a sidecar, then publish all of them.

        Returns the records to commit; nothing is committed yet.
        """
        store = self._host.store
        assert store is not None
        index_dir = self._host.directory.index
        records = []
        # a remote store's staging is a temporary copy, and `fsync: false` asks for no flushes: no hurry to disk
        flush = store.is_local and self._host.policy.fsync
        with store.staging() as stage, contextlib.ExitStack() as cleanup:
            # checksums a DurableFile computed for files of this save that were never taken
            cleanup.callback(durable.forget, stage)
            # other ranks waiting to upload their part of a checkpoint learn that this save failed
            cleanup.callback(peer_files.abandon_below, stage)
            staged: list[tuple[str, list[str], list[str]]] = []  # folder, files, files already fsynced
            uploads: list[peer_files.PeerFiles] = []  # other ranks' files, placed once this rank's are published
            for index, item in enumerate(plan.items):
                folder = stage_item(stage, index, item, write, self._current, to_disk=flush)
                files = _files_below(folder)
                if not files:
                    raise SaveError(f"saving {item.filename} produced no file")
                # The file named after the item comes first: it is what a framework loads.
                files.sort(key=lambda rel: (rel != item.filename, rel))
                entries, synced = self._describe(folder, files, flush)
                peers = peer_files.find(os.path.join(folder, item.filename))
                if peers is not None:
                    entries += self._peer_entries(item, peers)
                    uploads.append(peers)
                    entries.sort(key=lambda entry: entry.path)  # as if every file were here (a folder: no primary file)
                record = self._record(plan, index, item, entries)
                if os.path.isdir(os.path.join(folder, item.filename)):  # the item is a folder of files
                    record = replace(record, folder=item.filename)
                sidecar = sidecar_name(item.name)
                if index_dir is store:  # published with the files, ahead of them
                    durable.write_file(os.path.join(folder, sidecar), sidecar_bytes(record), sync=flush)
                    if flush:
                        synced.append(sidecar)
                    files = [sidecar, *files]
                staged.append((folder, files, synced))
                records.append(record)
            # An index kept beside the directory gets the sidecars ahead of the files they describe, the
            # order publishing keeps within one directory: a crash after this leaves files cleanup can find.
            described: list[str] = []
            try:
                for record in records if index_dir is not store else ():
                    index_dir.write_bytes(sidecar_name(record.name), sidecar_bytes(record))
                    described.append(sidecar_name(record.name))
                self._publish(store, staged)
            except BaseException:
                for name in described:
                    with contextlib.suppress(Exception):
                        index_dir.remove(name)
                raise
            try:
                for peers in uploads:
                    peers.settle(placed=True)
            except peer_files.OutcomeUnknown:
                raise  # a rank may still be uploading: the sidecars stay, for the next start's cleanup
            except BaseException:
                self.discard(records)  # the sidecars list every file: what was uploaded goes with them
                raise
        return records

    def _peer_entries(self, item: SaveItem, peers: peer_files.PeerFiles) -> list[FileEntry]:
        """The entries of the files other ranks upload into the item's folder themselves."""
        verify = self._host.policy.verify
        return [FileEntry(f"{item.filename}/{name}", size, checksum if verify else None) for name, checksum, size in peers.files]

    def _describe(self, folder: str, files: list[str], flush: bool) -> tuple[list[FileEntry], list[str]]:
        """The entries of an item's files (size, checksum when verified) and those already fsynced."""
        verify = self._host.policy.verify
        entries = []
        synced = []
        for rel in files:
            path = os.path.join(folder, *rel.split("/"))
            written = take_written(path)  # what a DurableFile knew as it wrote the file
            if written is not None:
                checksum, size = written.checksum if verify else None, written.size
                if written.synced:
                    synced.append(rel)
            elif verify:
                # Read back; a large file is fsynced meanwhile, which leaves publish's fsync nothing to wait for.
                with durable.syncing(path) if flush else contextlib.nullcontext():
                    checksum, size = checksum_file(path)
            else:
                checksum, size = None, os.path.getsize(path)
            entries.append(FileEntry(rel, size, checksum))
        return entries, synced

    def _record(self, plan: Plan, index: int, item: SaveItem, entries: list[FileEntry]) -> Record:
        host = self._host
        return Record(
            name=item.name,
            epoch=plan.epoch,
            step=plan.step,
            format=item.format,
            metrics=dict(plan.metrics),
            roles=item.roles,
            tags=item.roles,
            files=tuple(entries),
            created=time.time(),
            run=host.run,
            seq=host.manifest.next_seq + index,
            mid_epoch=item.mid_epoch,
        )

    @staticmethod
    def _publish(store: Store, staged: Sequence[tuple[str, list[str], list[str]]]) -> None:
        """Move the staged files into place, each item's sidecar first: a crash mid-publish leaves files cleanup can find."""
        try:
            for folder, relpaths, synced in staged:
                store.publish(folder, relpaths, synced=synced)
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # empty now: the staging folder then goes with one rmdir
        except BaseException:
            # what a failed publish put in place is uncommitted: take it back now (the names are this save's)
            for _folder, relpaths, _synced in staged:
                for rel in relpaths:
                    with contextlib.suppress(Exception):
                        store.remove(rel)
            raise

    def commit(self, new: Sequence[Record]) -> list[Record]:
        """Record the new checkpoints and the retention that follows in one manifest write.

        The in-memory manifest changes only once that write succeeded. Returns the records
        retention dropped, for `prune`.
        """
        host = self._host
        candidates = self.candidates()
        tags = retention.retain(host.policy, [*candidates, *new])
        change = host.manifest.change(
            add=[r.with_tags(tags[r.name]) for r in new if r.name in tags],
            drop=[r.name for r in candidates if r.name not in tags],
            tags={r.name: tags[r.name] for r in candidates if r.name in tags and tags[r.name] != r.tags},
            next_seq=max(host.manifest.next_seq, max(r.seq for r in new) + 1),
            policy=host.policy.to_dict(),
        )
        host.manifest = host.directory.commit_change(host.manifest, change)
        self.retained_in_full = True
        return [r for r in [*candidates, *new] if r.name not in tags]

    def rewind(self, record: Record, newer: Sequence[Record], commit: Callable[[], None]) -> None:
        """Take the run's records saved after the resume point out of the index, commit it, then delete them.

        Args:
            record: the resume point; the host's run is already its run.
            newer: the run's records saved after it (they failed verification, or a crash hid them).
            commit: writes the whole index (the engine's, which also knows an index exists from then on).
        """
        host = self._host
        manifest = host.manifest
        log.warning(
            "removing %d checkpoint(s) saved after the resume point %s: %s",
            len(newer),
            record.name,
            ", ".join(r.name for r in newer),
        )
        for r in newer:
            manifest.discard(r.name)
        manifest.history = [h for h in manifest.history if not (h.get("run") == host.run and h["epoch"] > record.epoch)]
        # Roles the removed records held (last, above all) return to the ones that remain.
        remaining = host.run_records()
        tags = retention.retain(host.policy, remaining)
        for r in remaining:
            if tags.get(r.name, r.tags) != r.tags:
                manifest.put(r.with_tags(tags[r.name]))
        self.retained_in_full = True
        commit()
        for r in newer:
            host.directory.remove_record_files(r)

    def candidates(self) -> list[Record]:
        """The run's records whose tags a new save can change, in save order.

        Once retention has run over the whole run with this policy, a save can only take
        tags from records that hold best, last, preempted or milestone, or from the snapshots
        beyond `keep`; a record that holds nothing but an unlimited snapshot stays as it is.
        So a save looks at a handful of records, not at all the epochs of a long run.
        """
        host = self._host
        if not self.retained_in_full:
            return host.run_records()
        tags = [BEST, LAST, PREEMPTED, MILESTONE]
        if host.policy.snapshots.keep is not None:
            tags.append(SNAPSHOT)
        found = {r.name: r for tag in tags for r in host.manifest.holders(host.run, tag)}
        return sorted(found.values(), key=lambda r: r.seq)

    def prune(self, removed: Sequence[Record]) -> None:
        """Delete what retention dropped; runs only after the commit that dropped it."""
        host = self._host
        for record in removed:
            host.directory.remove_record_files(record)
            log.log(host.level, "pruned %s (epoch %d)", record.name, record.epoch + host.epoch_base)

    def _log_save(self, records: Sequence[Record], seconds: float) -> None:
        host = self._host
        if not log.isEnabledFor(host.level):
            return
        policy = host.policy
        monitor = policy.monitor
        ranked = [r.name for r in host.top_k_records()]
        for record in records:
            value = record.score(monitor)
            shown = f" {monitor}={value:.4f}" if value is not None and monitor else ""
            rank = ""
            if BEST in record.roles and record.name in ranked:
                k = policy.top_k if policy.top_k > 0 else len(ranked)
                rank = f" best {ranked.index(record.name) + 1}/{k}"
            tags = ",".join(sorted(record.roles - {BEST}))
            log.log(
                host.level,
                "saved epoch %d%s%s%s in %.2f s: %s",
                record.epoch + host.epoch_base,
                shown,
                rank,
                f" [{tags}]" if tags else "",
                seconds,
                host.path_of(record),
            )


def _files_below(folder: str) -> list[str]:
    found = []
    for base, _dirs, files in os.walk(folder):
        for name in files:
            found.append(os.path.relpath(os.path.join(base, name), folder).replace(os.sep, "/"))
    return found
