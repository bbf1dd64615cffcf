"""The driver every adapter calls: at fit start (lock, clean, resume) and at epoch end (plan, write, commit, prune).

An adapter turns framework state into `(epoch, step, metrics)` and a writer
callable `write(item, path)` that saves one `SaveItem` in its format at a local
path. The engine decides, writes through the store, commits the manifest, and
only then prunes what retention no longer keeps.

`Engine` is a facade: it keeps the run (lock, index, resume) and hands the rest to
its parts, which read it live through small protocols (the policy can change mid-fit):
`planner` (what a save writes, step and time triggers), `transaction` (write, publish,
commit, prune) and `executor` (sync, background or async; one save in flight).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from checkpoint_hooks.core import retention, scratch
from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.directory import CheckpointDirectory, Problem
from checkpoint_hooks.core.errors import SaveError
from checkpoint_hooks.core.executor import WORKER_NICENESS, Executor, _lower_priority
from checkpoint_hooks.core.hashing import checksum_file, take_written
from checkpoint_hooks.core.lock import DirectoryLock
from checkpoint_hooks.core.manifest import Head, Manifest
from checkpoint_hooks.core.planner import (
    LAST_TEMPLATE,
    PREEMPTED_TEMPLATE,
    TRAINING_STATE,
    Plan,
    Planner,
    SaveItem,
    Writer,
    clean_metrics,
)
from checkpoint_hooks.core.records import BEST, LAST, Record
from checkpoint_hooks.core.store import LocalStore, Store, open_store
from checkpoint_hooks.core.transaction import CurrentItem, Transaction, _files_below
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError

__all__ = [
    "LAST_TEMPLATE",
    "PREEMPTED_TEMPLATE",
    "TRAINING_STATE",
    "WORKER_NICENESS",
    "Engine",
    "Plan",
    "SaveItem",
    "Writer",
    "_files_below",
    "_lower_priority",
    "checksum_file",
    "clean_metrics",
    "take_written",
]

log = logging.getLogger("checkpoint_hooks")


@dataclass
class Engine:
    """Retention and storage for one training run, framework-free.

    Args:
        policy: the checkpoint policy.
        extensions: file extension per format the adapter supports (".ckpt", ".keras", ...).
        default_format: the format used when the policy leaves `format` unset.
        resumable_formats: formats a run can resume from (training_state; Keras's .keras models too).
        epoch_base: added to the 0-based epoch in file names (Keras names epochs from 1).
        is_writer: False on every process but the one that writes (rank zero).
        store: a store to use instead of the one `policy.dirpath` names.
    """

    policy: CheckpointPolicy
    extensions: Mapping[str, str]
    default_format: str = TRAINING_STATE
    resumable_formats: frozenset[str] = frozenset({TRAINING_STATE})
    epoch_base: int = 0
    is_writer: bool = True
    store: Store | None = None
    index_beside: bool = False  # where a new local directory keeps its index (core.layout)
    directory: CheckpointDirectory = field(init=False)
    _manifest: Manifest = field(init=False, default_factory=Manifest)
    run: str = field(init=False, default="")
    resumed_from: Record | None = field(init=False, default=None)
    _lock: DirectoryLock | None = field(init=False, default=None)
    _started: bool = field(init=False, default=False)
    _materialized: list[str] = field(init=False, default_factory=list)
    _index_exists: bool = field(init=False, default=False)
    # Fit start from the head: the full index is parsed when first needed (the first save, at the latest at close).
    _head: Head | None = field(init=False, default=None)
    _opening: threading.RLock = field(init=False, default_factory=threading.RLock)
    _clean_pending: bool = field(init=False, default=False)
    _adopt_pending: Record | None = field(init=False, default=None)
    _current: CurrentItem = field(init=False, repr=False, default_factory=CurrentItem)
    _planner: Planner = field(init=False, repr=False)
    _transaction: Transaction = field(init=False, repr=False)
    _executor: Executor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.format not in self.extensions:
            known = ", ".join(self.extensions)
            raise SaveError(f"format={self.format!r} is not available here; use one of {known}")
        if self.store is None:
            try:
                self.store = open_store(self.policy.dirpath)
            except NotADirectoryError as exc:
                raise PolicyError(f"{exc.strerror}. Received: dirpath={self.policy.dirpath!r}") from None
        if isinstance(self.store, LocalStore):
            self.store.fsync = self.policy.fsync
        self.directory = CheckpointDirectory(self.store, index_beside=self.index_beside)
        self._planner = Planner(self)
        self._transaction = Transaction(self, self._current)
        self._executor = Executor(self, self._save_now, self._transaction.fail, self._current)

    # -- properties -------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The directory's index (waits for it when fit start read only the head)."""
        if self._head is not None:
            with self._opening:  # the training thread and a background save may both ask first
                if self._head is not None:
                    self._finish_open()
        return self._manifest

    @manifest.setter
    def manifest(self, manifest: Manifest) -> None:
        self._manifest = manifest

    @property
    def format(self) -> str:
        return self.policy.format or self.default_format

    @property
    def level(self) -> int:
        return logging.INFO if self.policy.verbose else logging.DEBUG

    def run_records(self) -> list[Record]:
        return self.manifest.run_records(self.run)

    def top_k_records(self) -> list[Record]:
        """The records the top-k rule keeps, best first (newest first without a monitor)."""
        members = self.manifest.holders(self.run, BEST)
        if self.policy.monitor is None:
            return sorted(members, key=lambda r: -r.seq)
        mode = self.policy.resolved_mode
        return sorted(members, key=lambda r: (retention.rank_value(r.score(self.policy.monitor), mode), r.seq))

    @property
    def best_record(self) -> Record | None:
        ranked = self.top_k_records()
        return ranked[0] if ranked else None

    @property
    def last_record(self) -> Record | None:
        lasts = self.manifest.holders(self.run, LAST)
        return lasts[-1] if lasts else None

    @property
    def best_model_path(self) -> str:
        """Where the best checkpoint is ('' before the first one)."""
        best = self.best_record
        return self.path_of(best) if best else ""

    @property
    def best_model_score(self) -> float | None:
        """The best monitored value; None before the first, without a monitor, or when it is NaN."""
        best = self.best_record
        score = best.score(self.policy.monitor) if best else None
        return None if score is None or math.isnan(score) else score

    @property
    def last_model_path(self) -> str:
        """Where the rolling last checkpoint is ('' before the first one)."""
        last = self.last_record
        return self.path_of(last) if last else ""

    def path_of(self, record: Record) -> str:
        assert self.store is not None
        return self.store.join(record.primary_path)

    # The parts' state under the names it had before the split (tests and adapters read some of it).

    @property
    def _last_save_time(self) -> float:
        return self._planner.last_save_time

    @_last_save_time.setter
    def _last_save_time(self, value: float) -> None:
        self._planner.last_save_time = value

    @property
    def _worker(self) -> ThreadPoolExecutor | None:
        return self._executor.worker

    @property
    def _inflight(self) -> Future[list[Record]] | None:
        return self._executor.inflight

    @property
    def _buffers(self) -> HostBuffers[Any] | None:
        return self._executor.buffers

    # -- fit start --------------------------------------------------------------------

    def start(self) -> Record | None:
        """Open the directory and pick the run to continue (`policy.resume == "auto"`) or start a new one.

        Returns the record to resume from (already verified), or None to start fresh.
        """
        if self._started:
            return self.resumed_from
        self.open()
        if not self.is_writer:
            return self._follow_resume()
        record = self.find_resume() if self.policy.resume == "auto" else None
        if record is not None:
            self.adopt(record)
        else:
            self.start_fresh()
        return record

    def _follow_resume(self) -> Record | None:
        """On a process that does not write: the record the writer resumes from, read without the lock.

        For frameworks with no way to hand the writer's choice to the other processes."""
        self.run = uuid.uuid4().hex[:12]
        if self.policy.resume != "auto":
            return None
        manifest = self.directory.read_manifest()
        if manifest is None:
            return None
        self.manifest = manifest
        self.resumed_from = self.find_resume()
        return self.resumed_from

    def open(self) -> None:
        """Lock the directory, read its manifest and clean what interrupted saves left behind.

        Adapters whose framework restores callback state before training starts call
        this first, then `adopt` (or `start_fresh`) once they know where the run begins.
        """
        if self._started:
            return
        self._started = True
        self._planner.last_save_time = time.monotonic()  # every_n_minutes counts from the fit's start
        if not self.is_writer:
            return
        self._lock = DirectoryLock(self.directory.index)
        self._lock.acquire()
        try:
            head = self.directory.read_head() if self.policy.resume == "auto" else None
            if head is not None:
                # Where to resume is in the head; the index a long run has grown is parsed (and the
                # directory cleaned) when first needed, after the framework has loaded the checkpoint.
                self._head, self._index_exists = head, True
                self._clean_pending = self._lock.unclean or head.journal_lines > 0
                return
            manifest = self.directory.read_manifest()
            self._index_exists = manifest is not None
            self.manifest = manifest if manifest is not None else self.directory.load()
            # after a clean end there is nothing to clean, and a long run's directory is not walked
            if self._lock.unclean or self.manifest.journal_lines or not self._index_exists:
                self.directory.clean_uncommitted(self.manifest)
        except BaseException:
            self.close()
            raise

    def _finish_open(self) -> None:
        """Take the parsed index, then do what fit start left for it: clean, and settle the resume."""
        assert self._head is not None
        self._manifest = self.directory.parse(self._head)  # an unreadable index raises here, at every use
        self._head = None
        if self._clean_pending:
            self._clean_pending = False
            self.directory.clean_uncommitted(self._manifest)
        record, self._adopt_pending = self._adopt_pending, None
        if record is not None:
            self._settle(record, discard_newer=True)

    @property
    def run_decided(self) -> bool:
        return bool(self.run)

    def start_fresh(self) -> None:
        """Begin a new run; checkpoints of earlier runs in the directory stay untouched."""
        self.run = uuid.uuid4().hex[:12]
        self.resumed_from = None
        self._transaction.retained_in_full = True  # a new run has no records yet
        if not self.is_writer:
            return
        if self.manifest.records:
            log.warning(
                "%s holds %d checkpoint(s) of earlier runs; they stay untouched and this run keeps its own",
                self.directory.url,
                len(self.manifest.records),
            )
        self._commit_if_changed()

    def _commit_if_changed(self) -> None:
        """Write the index at fit start only when it has to change (a long run's index is large)."""
        if self._index_exists and self.manifest.policy == self.policy.to_dict():
            return  # a journal left by a crash stays: it is folded in at close
        self._commit_index()

    def _commit_index(self) -> None:
        self.manifest.policy = self.policy.to_dict()
        self.directory.commit(self.manifest)
        self._index_exists = True

    def resume_candidates(self) -> Iterator[Record]:
        """Resumable records, newest first: from the head while the index loads, the index when needed."""
        given: set[str] = set()
        head = self._head
        if head is not None:
            for record in head.records:
                if record.format in self.resumable_formats:
                    given.add(record.name)
                    yield record
            if not head.more & self.resumable_formats:
                return  # the head listed every resumable record
        found = [r for r in self.manifest.records if r.format in self.resumable_formats and r.name not in given]
        yield from sorted(found, key=lambda r: -r.seq)

    def find_resume(self) -> Record | None:
        """The newest resumable record whose files verify; corrupt ones are skipped with a warning."""
        for record in self.resume_candidates():
            problems = self.directory.verify_record(record, checksums=self.policy.verify)
            if not problems:
                return record
            self.warn_skipped(record, problems)
        return None

    def warn_skipped(self, record: Record, problems: Sequence[Problem]) -> None:
        """Say that `record` fails verification and resume goes on with the one before it."""
        log.warning(
            "skipping checkpoint %s for resume: %s; trying the previous one",
            self.path_of(record),
            "; ".join(str(p) for p in problems),
        )

    def adopt(self, record: Record, discard_newer: bool = True) -> None:
        """Continue `record`'s run from it.

        Records of that run saved after it failed verification (automatic resume)
        or belong to a timeline the user chose to leave (an explicit older path).
        The first are removed so retention goes on as if the run never stopped;
        for the second (`discard_newer=False`) the run forks and nothing is deleted.
        """
        self.resumed_from = record
        if discard_newer and self._head is not None:
            self.run = record.run  # the rest waits for the index (see _finish_open)
            self._adopt_pending = record
        else:
            self._settle(record, discard_newer)
        log.log(
            self.level,
            "resuming from %s (epoch %d, step %d)",
            self.path_of(record),
            record.epoch + self.epoch_base,
            record.step,
        )

    def _settle(self, record: Record, discard_newer: bool) -> None:
        """The part of `adopt` that needs the whole index: newer records, and the index's policy."""
        # the tags were given by this policy (not another one, not a rebuild from sidecars)
        self._transaction.retained_in_full = self.manifest.policy == self.policy.to_dict()
        newer = [r for r in self.manifest.run_records(record.run) if r.seq > record.seq]
        if newer and not discard_newer:
            self.run = uuid.uuid4().hex[:12]
            self._transaction.retained_in_full = True
            log.warning(
                "resuming from %s, which has %d newer checkpoint(s) in its run; they stay untouched "
                "and this run keeps its own",
                record.name,
                len(newer),
            )
            newer = []
        else:
            self.run = record.run
        if newer:
            self._transaction.rewind(record, newer, commit=self._commit_index)
        else:
            self._commit_if_changed()

    def find_record(self, path: str) -> Record | None:
        """The committed record a user-given path points to, if it is one of ours."""
        assert self.store is not None
        for record in self.manifest.records:
            if path in (self.path_of(record), record.primary_path, record.name) or os.path.abspath(path) == self.path_of(record):
                return record
        return None

    def local_path(self, record: Record, url_for_folders: bool = False) -> str:
        """A local path of the record's primary file for a framework to load (downloaded for remote stores).

        A download lives until the first epoch end (the framework has loaded it by then) or `close`.
        With `url_for_folders`, a folder on a remote store is not downloaded: its URL is returned,
        where every rank reads its own part.
        """
        assert self.store is not None
        if url_for_folders and record.folder is not None and not self.store.is_local:
            return self.store.join(record.primary_path)
        if self.store.is_local:
            for entry in record.files[0 if record.folder else 1:]:  # every file the framework may read: regular
                with self.store.local_path(entry.path):
                    pass
            with self.store.local_path(record.primary_path, folder=record.folder is not None) as path:
                return path
        tmp = scratch.folder("resume")
        self._materialized.append(tmp)
        for entry in record.files:
            target = os.path.join(tmp, *entry.path.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with self.store.local_path(entry.path) as downloaded:
                shutil.copyfile(downloaded, target)
        return os.path.join(tmp, *record.primary_path.split("/"))

    def _drop_downloads(self) -> None:
        """Remove the local copies `local_path` downloaded: a crash later in a long run would leave them."""
        for tmp in self._materialized:
            shutil.rmtree(tmp, ignore_errors=True)
        self._materialized.clear()

    # -- epoch end --------------------------------------------------------------------

    def monitored_value(self, metrics: Mapping[str, float]) -> float | None:
        return self._planner.monitored_value(metrics)

    def require_monitor(self, metrics: Mapping[str, Any]) -> None:
        """Raise MonitorError naming the keys that do appear when the monitor is missing."""
        self._planner.require_monitor(metrics)

    def plan(self, epoch: int, step: int, metrics: Mapping[str, Any], *, mid_epoch: bool = False) -> Plan:
        """What this epoch end (or, `mid_epoch`, a save point ranked like one inside the epoch) saves.
        A missing monitored value skips the top-k rule for this save only."""
        self._between_saves()
        return self._planner.epoch_end(epoch, step, self._observe(epoch, step, metrics), mid_epoch=mid_epoch)

    def plan_training_state(
        self, epoch: int, step: int, metrics: Mapping[str, Any], *, mid_epoch: bool, preempted: bool = False
    ) -> Plan:
        """One training_state outside the epoch-end rules: a step or time trigger, or a save on preemption.

        It becomes the rolling last (the resume point); `epoch` is the epoch it was saved in and
        `mid_epoch` says whether that epoch had finished.
        """
        self._between_saves()
        return self._planner.training_state(epoch, step, metrics, mid_epoch=mid_epoch, preempted=preempted)

    def _between_saves(self) -> None:
        """Before planning: the save in flight is over, and the framework has loaded any downloaded resume point."""
        self.wait()  # retention decides on what is committed, including a save still in flight
        self._drop_downloads()

    def step_due(self, step: int) -> bool:
        """Whether `every_n_steps` asks for a save at this global step."""
        return self._planner.step_due(step)

    def time_due(self) -> bool:
        """Whether `every_n_minutes` of wall time passed since the last save (or the fit's start)."""
        return self._planner.time_due(time.monotonic())

    def _observe(self, epoch: int, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = self._planner.observe(metrics)
        if self.is_writer:
            if not self.run_decided:
                self.start_fresh()
            # kept in memory until the next commit writes it (epochs without a save included)
            self.manifest.history.append({"run": self.run, "epoch": epoch, "step": step, "metrics": values})
        return values

    def save(self, epoch: int, step: int, metrics: Mapping[str, Any], write: Writer) -> list[Record]:
        return self.execute(self.plan(epoch, step, metrics), write)

    def fail(self, plan: Plan, exc: Exception) -> None:
        """A failed save of `plan`: raise it as the SaveError a user reads, or only warn (on_save_error='warn')."""
        self._transaction.fail(plan, exc)

    def execute(self, plan: Plan, write: Writer, background: bool = False) -> list[Record]:
        """Write the plan's items, commit them in one manifest write, then prune.

        With `background=True` only `write` runs here, into a staging folder; hashing, fsync,
        publishing, the commit and pruning run in the worker thread (as in `execute_async`)
        and the committed records are not returned. The framework's state is saved before
        this returns, so training cannot change it mid-write.
        """
        return self._executor.submit(plan, write, background=background)

    def execute_here(self, plan: Plan, write: Writer) -> list[Record]:
        """`execute` on this thread without waiting for the save in flight: for a job that is that save."""
        return self._executor.save_here(plan, write)

    def execute_in_background(self, job: Callable[[], Any]) -> None:
        """Run `job` in the save worker of this process, writer or not: a save every process takes part in,
        which calls `execute_here`. It is the save in flight (one at a time): the next plan, save,
        `wait` or `close` waits for it and raises its error."""
        self._executor.submit_job(job)

    def execute_async(
        self,
        plan: Plan,
        snapshot: Callable[[SaveItem], Any],
        write: Callable[[SaveItem, Any, str], None],
        buffers: HostBuffers[Any] | None = None,
    ) -> None:
        """Save in the background: only `snapshot(item)` (a copy of the state in host memory) runs here.

        Writing, hashing, committing and pruning run in a worker thread through the same
        steps as `execute`, so nothing is visible before its commit. At most one save is in
        flight: this and every plan wait for the previous one. Its error surfaces at the next
        plan or save, or at `wait()`/`close()` (the end of fit). `buffers`, the arrays
        `snapshot` copies into, are free again once that wait is over: they are recycled
        before the snapshot, and let go at `close()`.
        """
        self._executor.submit(plan, snapshot=snapshot, write_snapshot=write, buffers=buffers)

    def wait(self) -> None:
        """Wait for the background save in flight, if any, and raise its error."""
        self._executor.wait()

    def _save_now(self, plan: Plan, write: Writer) -> list[Record]:
        """One plan's transaction on this thread; the step and time triggers count from its commit."""
        return self._transaction.save(plan, write, lambda: self._planner.saved(plan.step, time.monotonic()))

    def _write(self, plan: Plan, write: Writer) -> list[Record]:
        return self._transaction.write(plan, write)

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The retention state as saved inside a framework checkpoint (the manifest holds the full copy)."""
        return {
            "run": self.run,
            "dirpath": self.directory.url,
            "best_model_path": self.best_model_path,
            "best_model_score": self.best_model_score,
            "best_k_models": {self.path_of(r): r.score(self.policy.monitor) for r in self.top_k_records()},
            "last_model_path": self.last_model_path,
            "record": self._current.item.name if self._current.item else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from the record a framework checkpoint was saved as, when it is in this directory."""
        name = state.get("record")
        if not self.is_writer or not name:
            return
        record = self.manifest.by_name(str(name))
        if record is not None and record != self.resumed_from:
            self.adopt(record, discard_newer=False)

    def problems(self, record: Record) -> list[Problem]:
        return self.directory.verify_record(record, checksums=self.policy.verify)

    # -- end --------------------------------------------------------------------------

    def close(self) -> None:
        """Finish a background save, release the directory; raises that save's error, if any."""
        try:
            self.wait()
        finally:
            self._compact()
            self._release()

    def _compact(self) -> None:
        """Finish what fit start left for the index, then fold the journal into manifest.json."""
        if self._lock is None:
            return
        try:
            manifest = self.manifest  # a run that ended before its first save still cleans up
            if manifest.journal_lines:
                self.directory.commit(manifest)
        except Exception as exc:  # the journal is as valid as the base: nothing is lost
            log.debug("could not fold the journal of %s into its manifest: %s", self.directory.url, exc)

    def _release(self) -> None:
        self._executor.close()
        self._drop_downloads()
        if self._lock is not None:
            # a save whose other ranks may still have been uploading: the next start cleans up as after a crash
            self._lock.release(as_crashed=self._transaction.unsettled)
            self._lock = None
        self._started = False
