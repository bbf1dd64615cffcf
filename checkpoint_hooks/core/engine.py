"""The driver every adapter calls: at fit start (lock, clean, resume) and at epoch end (plan, write, commit, prune).

An adapter turns framework state into `(epoch, step, metrics)` and a writer
callable `write(item, path)` that saves one `SaveItem` in its format at a local
path. The engine decides, writes through the store, commits the manifest, and
only then prunes what retention no longer keeps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from checkpoint_hooks.core import durable, retention
from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.directory import CheckpointDirectory, Problem
from checkpoint_hooks.core.errors import MonitorError, SaveError
from checkpoint_hooks.core.hashing import checksum_file, take_written
from checkpoint_hooks.core.lock import DirectoryLock
from checkpoint_hooks.core.manifest import Head, Manifest, sidecar_bytes, sidecar_name
from checkpoint_hooks.core.naming import format_name, unique_name
from checkpoint_hooks.core.records import BEST, LAST, MILESTONE, PREEMPTED, SNAPSHOT, FileEntry, Record
from checkpoint_hooks.core.store import Store, open_store
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError

log = logging.getLogger("checkpoint_hooks")

TRAINING_STATE = "training_state"
LAST_TEMPLATE = "last-epoch={epoch:03d}-step={step}"
PREEMPTED_TEMPLATE = "preempted-epoch={epoch:03d}-step={step}"
# The background save thread's nice value (Linux): it takes the CPU time training leaves idle.
WORKER_NICENESS = 19


@dataclass(frozen=True)
class SaveItem:
    """One checkpoint to write at this epoch end."""

    name: str
    format: str
    roles: frozenset[str]
    filename: str  # name + the format's extension
    mid_epoch: bool = False


@dataclass(frozen=True)
class Plan:
    epoch: int
    step: int
    metrics: Mapping[str, float]
    items: tuple[SaveItem, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items)


Writer = Callable[[SaveItem, str], None]


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics as floats; values that are not numbers (lists of one are unwrapped) are left out."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        try:
            clean[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return clean


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
    directory: CheckpointDirectory = field(init=False)
    _manifest: Manifest = field(init=False, default_factory=Manifest)
    run: str = field(init=False, default="")
    resumed_from: Record | None = field(init=False, default=None)
    _lock: DirectoryLock | None = field(init=False, default=None)
    _started: bool = field(init=False, default=False)
    _materialized: list[str] = field(init=False, default_factory=list)
    _writing: SaveItem | None = field(init=False, default=None)
    _seen_metrics: set[str] = field(init=False, default_factory=set)
    _last_save_time: float = field(init=False, default_factory=time.monotonic)
    _last_saved_step: int = field(init=False, default=-1)
    _worker: ThreadPoolExecutor | None = field(init=False, default=None)
    _inflight: Future[list[Record]] | None = field(init=False, default=None)
    _buffers: HostBuffers[Any] | None = field(init=False, default=None)  # what background snapshots copy into
    _index_exists: bool = field(init=False, default=False)
    _retained_in_full: bool = field(init=False, default=False)  # see _retention_candidates
    # Fit start from the head: the full index is parsed when first needed (the first save, at the latest at close).
    _head: Head | None = field(init=False, default=None)
    _opening: threading.RLock = field(init=False, default_factory=threading.RLock)
    _clean_pending: bool = field(init=False, default=False)
    _adopt_pending: Record | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.format not in self.extensions:
            known = ", ".join(self.extensions)
            raise SaveError(f"format={self.format!r} is not available here; use one of {known}")
        if self.store is None:
            try:
                self.store = open_store(self.policy.dirpath)
            except NotADirectoryError as exc:
                raise PolicyError(f"{exc.strerror}. Received: dirpath={self.policy.dirpath!r}") from None
        self.directory = CheckpointDirectory(self.store)

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
        self._last_save_time = time.monotonic()  # every_n_minutes counts from the fit's start
        if not self.is_writer:
            return
        self._lock = DirectoryLock(self.store)
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
        self._retained_in_full = True  # a new run has no records yet
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
        policy = self.policy.to_dict()
        if self._index_exists and self.manifest.policy == policy:
            return  # a journal left by a crash stays: it is folded in at close
        self.manifest.policy = policy
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
        self._retained_in_full = self.manifest.policy == self.policy.to_dict()
        newer = [r for r in self.manifest.run_records(record.run) if r.seq > record.seq]
        if newer and not discard_newer:
            self.run = uuid.uuid4().hex[:12]
            self._retained_in_full = True
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
            log.warning(
                "removing %d checkpoint(s) saved after the resume point %s: %s",
                len(newer),
                record.name,
                ", ".join(r.name for r in newer),
            )
            for r in newer:
                self.manifest.discard(r.name)
            self.manifest.history = [
                h for h in self.manifest.history if not (h.get("run") == self.run and h["epoch"] > record.epoch)
            ]
            # Roles the removed records held (last, above all) return to the ones that remain.
            remaining = self.run_records()
            tags = retention.retain(self.policy, remaining)
            for r in remaining:
                if tags.get(r.name, r.tags) != r.tags:
                    self.manifest.put(r.with_tags(tags[r.name]))
            self._retained_in_full = True
        if newer:
            self.manifest.policy = self.policy.to_dict()
            self.directory.commit(self.manifest)
            self._index_exists = True
        else:
            self._commit_if_changed()
        for r in newer:
            self.directory.remove_record_files(r)

    def find_record(self, path: str) -> Record | None:
        """The committed record a user-given path points to, if it is one of ours."""
        assert self.store is not None
        for record in self.manifest.records:
            if path in (self.path_of(record), record.primary_path, record.name) or os.path.abspath(path) == self.path_of(record):
                return record
        return None

    def local_path(self, record: Record) -> str:
        """A local path of the record's primary file for a framework to load (downloaded for remote stores).

        A download lives until the first epoch end (the framework has loaded it by then) or `close`.
        """
        assert self.store is not None
        if self.store.is_local:
            return self.path_of(record)
        tmp = tempfile.mkdtemp(prefix="checkpoint_hooks-resume-")
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
        monitor = self.policy.monitor
        return None if monitor is None else metrics.get(monitor)

    def require_monitor(self, metrics: Mapping[str, Any]) -> None:
        """Raise MonitorError naming the keys that do appear when the monitor is missing."""
        monitor = self.policy.monitor
        if monitor is not None and monitor not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            raise MonitorError(
                f"monitor={monitor!r} is not among the logged metrics ({available}); "
                f"log it, or set monitor to one of those"
            )

    def plan(self, epoch: int, step: int, metrics: Mapping[str, Any]) -> Plan:
        """What this epoch end saves. A missing monitored value skips the top-k rule for this epoch only."""
        self.wait()  # retention decides on what is committed, including a save still in flight
        self._drop_downloads()
        values = self._observe(epoch, step, metrics)
        roles = retention.plan_save(self.policy, self.manifest.holders(self.run, BEST), epoch, self.monitored_value(values))
        if not roles:
            return Plan(epoch, step, values)
        namer = self._namer(epoch, step, values)
        items: list[SaveItem] = []
        wanted = roles.names()
        if self.format in self.resumable_formats:
            items.append(namer(self.policy.filename_template, self.format, wanted))
        else:
            if wanted - {LAST}:
                items.append(namer(self.policy.filename_template, self.format, wanted - {LAST}))
            if roles.last:
                items.append(namer(LAST_TEMPLATE, TRAINING_STATE, frozenset({LAST})))
        return Plan(epoch, step, values, tuple(items))

    def plan_training_state(
        self, epoch: int, step: int, metrics: Mapping[str, Any], *, mid_epoch: bool, preempted: bool = False
    ) -> Plan:
        """One training_state outside the epoch-end rules: a step or time trigger, or a save on preemption.

        It becomes the rolling last (the resume point); `epoch` is the epoch it was saved in and
        `mid_epoch` says whether that epoch had finished.
        """
        self.wait()
        self._drop_downloads()
        values = clean_metrics(metrics)
        roles = frozenset({LAST, PREEMPTED} if preempted else {LAST})
        template = PREEMPTED_TEMPLATE if preempted else LAST_TEMPLATE
        item = self._namer(epoch, step, values)(template, TRAINING_STATE, roles)
        return Plan(epoch, step, values, (replace(item, mid_epoch=mid_epoch),))

    def step_due(self, step: int) -> bool:
        """Whether `every_n_steps` asks for a save at this global step."""
        every = self.policy.every_n_steps
        return every is not None and step > 0 and step % every == 0 and step != self._last_saved_step

    def time_due(self) -> bool:
        """Whether `every_n_minutes` of wall time passed since the last save (or the fit's start)."""
        minutes = self.policy.every_n_minutes
        return minutes is not None and time.monotonic() - self._last_save_time >= minutes * 60

    def _observe(self, epoch: int, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = clean_metrics(metrics)
        self._seen_metrics.update(values)
        if self.is_writer:
            if not self.run_decided:
                self.start_fresh()
            # kept in memory until the next commit writes it (epochs without a save included)
            self.manifest.history.append({"run": self.run, "epoch": epoch, "step": step, "metrics": values})
        return values

    def _namer(self, epoch: int, step: int, values: Mapping[str, float]) -> Callable[[str, str, frozenset[str]], SaveItem]:
        """Makes unique SaveItems for this save from name templates."""
        # A metric logged on other epochs (or the monitor) but not this one shows as nan in the name;
        # a placeholder never logged at all stays an error (most likely a typo).
        fields: dict[str, Any] = {name: math.nan for name in self._seen_metrics}
        if self.policy.monitor is not None:
            fields[self.policy.monitor] = math.nan
        fields.update(values)
        fields.update(epoch=epoch + self.epoch_base, step=step)
        given: set[str] = set()
        manifest = self.manifest

        class Taken:  # the manifest's names and this save's, without copying a long run's names
            def __contains__(self, name: object) -> bool:
                return name in given or name in manifest

        def make(template: str, fmt: str, roles: frozenset[str]) -> SaveItem:
            name = unique_name(format_name(template, fields), Taken())
            given.add(name)
            return SaveItem(name, fmt, roles, name + self.extensions[fmt])

        return make

    def save(self, epoch: int, step: int, metrics: Mapping[str, Any], write: Writer) -> list[Record]:
        return self.execute(self.plan(epoch, step, metrics), write)

    def execute(self, plan: Plan, write: Writer, background: bool = False) -> list[Record]:
        """Write the plan's items, commit them in one manifest write, then prune.

        With `background=True` only `write` runs here, into a staging folder; hashing, fsync,
        publishing, the commit and pruning run in the worker thread (as in `execute_async`)
        and the committed records are not returned. The framework's state is saved before
        this returns, so training cannot change it mid-write.
        """
        self.wait()
        if not plan:
            return []
        if not self.run_decided:
            self.start_fresh()
        if not self.is_writer:
            # Other ranks still call the writer: some frameworks gather state collectively.
            with tempfile.TemporaryDirectory(prefix="checkpoint_hooks-rank-") as scratch:
                for item in plan.items:
                    write(item, os.path.join(scratch, item.filename))
            return []
        if not background:
            return self._save_now(plan, write)
        assert self.store is not None
        stack = contextlib.ExitStack()
        prewritten = stack.enter_context(self.store.staging())
        try:
            for index, item in enumerate(plan.items):
                folder = os.path.join(prewritten, str(index))
                os.mkdir(folder)
                self._writing = item
                try:
                    write(item, os.path.join(folder, item.filename))
                finally:
                    self._writing = None
        except Exception as exc:
            stack.close()
            self._fail(plan, exc)
            return []
        positions = {item.name: index for index, item in enumerate(plan.items)}

        def move(item: SaveItem, path: str) -> None:
            folder = os.path.join(prewritten, str(positions[item.name]))
            for entry in os.listdir(folder):  # a rename: the bytes were written on the training thread
                os.replace(os.path.join(folder, entry), os.path.join(os.path.dirname(path), entry))

        self._submit(plan, move, stack.close)
        return []

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
        self.wait()
        if not plan:
            return
        if buffers is not None:
            buffers.recycle()
            self._buffers = buffers
        if not self.run_decided:
            self.start_fresh()
        payloads: dict[str, Any] = {}
        for item in plan.items:
            self._writing = item  # a framework's state_dict hooks may ask which record this becomes
            try:
                payloads[item.name] = snapshot(item)
            finally:
                self._writing = None
        if not self.is_writer:
            return
        self._submit(plan, lambda item, path: write(item, payloads[item.name], path))

    def _submit(self, plan: Plan, write: Writer, cleanup: Callable[[], Any] | None = None) -> None:
        """Run `_save_now` in the single worker thread; `cleanup` runs after it, whatever happens."""

        def run() -> list[Record]:
            try:
                return self._save_now(plan, write)
            finally:
                if cleanup is not None:
                    cleanup()

        if self._worker is None:
            self._worker = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="checkpoint_hooks-save", initializer=_lower_priority
            )
        self._inflight = self._worker.submit(run)

    def wait(self) -> None:
        """Wait for the background save in flight, if any, and raise its error."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def _save_now(self, plan: Plan, write: Writer) -> list[Record]:
        started = time.perf_counter()
        records: list[Record] = []
        try:
            records = self._write(plan, write)
            removed = self._commit(records)
        except Exception as exc:
            self._discard(records)
            self._fail(plan, exc)
            return []
        self._last_save_time = time.monotonic()
        self._last_saved_step = plan.step
        self._log_save(records, time.perf_counter() - started)
        self._prune(removed)
        return records

    def _fail(self, plan: Plan, exc: Exception) -> None:
        """A failed save: raise it as SaveError, or only warn with on_save_error='warn'."""
        error = self._save_error(plan, exc)
        if self.policy.on_save_error == "warn":
            log.warning("%s; training goes on (on_save_error='warn')", error)
            return
        raise error from exc

    def _discard(self, records: Sequence[Record]) -> None:
        """Remove what a failed save published without a commit (the next start would, too)."""
        for record in records:
            try:
                self.directory.remove_record_files(record)
            except Exception:  # the failure that got us here may stop this as well
                pass

    def _save_error(self, plan: Plan, exc: Exception) -> SaveError:
        if isinstance(exc, SaveError):
            return exc
        names = ", ".join(i.filename for i in plan.items)
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        needed = ""
        previous = self.manifest.holders(self.run, LAST) or self.run_records()
        if previous:
            needed = f" (the previous save took {previous[-1].bytes} bytes)"
        where = self.directory.url
        return SaveError(
            f"could not save {names} to {where} at epoch {plan.epoch}: {reason}{needed}; "
            "nothing of it was committed and earlier checkpoints are intact"
        )

    def _write(self, plan: Plan, write: Writer) -> list[Record]:
        assert self.store is not None
        records = []
        local = self.store.is_local  # a remote store's staging is a temporary copy: no need to hurry it to disk
        with self.store.staging() as stage, contextlib.ExitStack() as cleanup:
            # checksums a DurableFile computed for files of this save that were never taken
            cleanup.callback(durable.forget, stage)
            staged: list[tuple[str, list[str], list[str]]] = []  # folder, files, files already fsynced
            for index, item in enumerate(plan.items):
                folder = os.path.join(stage, str(index))
                os.mkdir(folder)
                self._writing = item
                try:
                    # DurableFiles fsync as they close; the disk starts writing what other writers write
                    with durable.saving_to_disk(folder) if local else contextlib.nullcontext():
                        write(item, os.path.join(folder, item.filename))
                finally:
                    self._writing = None
                files = _files_below(folder)
                if not files:
                    raise SaveError(f"saving {item.filename} produced no file")
                # The file named after the item comes first: it is what a framework loads.
                files.sort(key=lambda rel: (rel != item.filename, rel))
                entries = []
                synced = []
                for rel in files:
                    path = os.path.join(folder, *rel.split("/"))
                    written = take_written(path)  # what a DurableFile knew as it wrote the file
                    if written is not None:
                        checksum, size = written.checksum if self.policy.verify else None, written.size
                        if written.synced:
                            synced.append(rel)
                    elif self.policy.verify:
                        # Read back; a large file is fsynced meanwhile, which leaves publish's fsync nothing to wait for.
                        with durable.syncing(path) if local else contextlib.nullcontext():
                            checksum, size = checksum_file(path)
                    else:
                        checksum, size = None, os.path.getsize(path)
                    entries.append(FileEntry(rel, size, checksum))
                record = Record(
                    name=item.name,
                    epoch=plan.epoch,
                    step=plan.step,
                    format=item.format,
                    metrics=dict(plan.metrics),
                    roles=item.roles,
                    tags=item.roles,
                    files=tuple(entries),
                    created=time.time(),
                    run=self.run,
                    seq=self.manifest.next_seq + index,
                    mid_epoch=item.mid_epoch,
                )
                sidecar = sidecar_name(item.name)
                durable.write_file(os.path.join(folder, sidecar), sidecar_bytes(record), sync=local)
                if local:
                    synced.append(sidecar)
                staged.append((folder, [sidecar, *files], synced))
                records.append(record)
            # The sidecar goes first: a crash mid-publish leaves files that cleanup can find.
            try:
                for folder, relpaths, synced in staged:
                    self.store.publish(folder, relpaths, synced=synced)
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)  # empty now: the staging folder then goes with one rmdir
            except BaseException:
                # what a failed publish put in place is uncommitted: take it back now (the names are this save's)
                for _folder, relpaths, _synced in staged:
                    for rel in relpaths:
                        with contextlib.suppress(Exception):
                            self.store.remove(rel)
                raise
        return records

    def _commit(self, new: Sequence[Record]) -> list[Record]:
        """Record the new checkpoints and the retention that follows in one manifest write.

        The in-memory manifest changes only once that write succeeded."""
        candidates = self._retention_candidates()
        tags = retention.retain(self.policy, [*candidates, *new])
        change = self.manifest.change(
            add=[r.with_tags(tags[r.name]) for r in new if r.name in tags],
            drop=[r.name for r in candidates if r.name not in tags],
            tags={r.name: tags[r.name] for r in candidates if r.name in tags and tags[r.name] != r.tags},
            next_seq=max(self.manifest.next_seq, max(r.seq for r in new) + 1),
            policy=self.policy.to_dict(),
        )
        self.manifest = self.directory.commit_change(self.manifest, change)
        self._retained_in_full = True
        return [r for r in [*candidates, *new] if r.name not in tags]

    def _retention_candidates(self) -> list[Record]:
        """The run's records whose tags a new save can change, in save order.

        Once retention has run over the whole run with this policy, a save can only take
        tags from records that hold best, last, preempted or milestone, or from the snapshots
        beyond `keep`; a record that holds nothing but an unlimited snapshot stays as it is.
        So a save looks at a handful of records, not at all the epochs of a long run.
        """
        if not self._retained_in_full:
            return self.run_records()
        tags = [BEST, LAST, PREEMPTED, MILESTONE]
        if self.policy.snapshots.keep is not None:
            tags.append(SNAPSHOT)
        found = {r.name: r for tag in tags for r in self.manifest.holders(self.run, tag)}
        return sorted(found.values(), key=lambda r: r.seq)

    def _prune(self, removed: Sequence[Record]) -> None:
        """Delete what retention dropped; runs only after the commit that dropped it."""
        for record in removed:
            self.directory.remove_record_files(record)
            log.log(self.level, "pruned %s (epoch %d)", record.name, record.epoch + self.epoch_base)

    def _log_save(self, records: Sequence[Record], seconds: float) -> None:
        if not log.isEnabledFor(self.level):
            return
        monitor = self.policy.monitor
        ranked = [r.name for r in self.top_k_records()]
        for record in records:
            value = record.score(monitor)
            shown = f" {monitor}={value:.4f}" if value is not None and monitor else ""
            rank = ""
            if BEST in record.roles and record.name in ranked:
                k = self.policy.top_k if self.policy.top_k > 0 else len(ranked)
                rank = f" best {ranked.index(record.name) + 1}/{k}"
            tags = ",".join(sorted(record.roles - {BEST}))
            log.log(
                self.level,
                "saved epoch %d%s%s%s in %.2f s: %s",
                record.epoch + self.epoch_base,
                shown,
                rank,
                f" [{tags}]" if tags else "",
                seconds,
                self.path_of(record),
            )

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
            "record": self._writing.name if self._writing else None,
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
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._buffers is not None:
            self._buffers.clear()  # the saves are over: the state's copy need not stay in memory
            self._buffers = None
        self._drop_downloads()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._started = False


def _files_below(folder: str) -> list[str]:
    found = []
    for base, _dirs, files in os.walk(folder):
        for name in files:
            found.append(os.path.relpath(os.path.join(base, name), folder).replace(os.sep, "/"))
    return found


def _lower_priority() -> None:
    """Run the calling thread at the lowest CPU priority, where threads have their own (Linux).

    On two cores a save's pickling, hashing and bookkeeping otherwise take a core from the
    framework's compute threads in the middle of an epoch. Threads it starts inherit it.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
