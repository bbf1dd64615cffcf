"""`FitSession`: the life of one fit, written once for every framework.

An adapter turns its framework's hooks into these calls:

    session.open()                        # when the framework restores callbacks (optional, else in begin)
    point = session.begin()               # lock, resume choice, restore through the framework, start
    session.epoch_begin(epoch)
    session.batch_end(step, last_batch=...)   # safe point: SIGTERM, step/time triggers
    session.epoch_end(epoch, step, metrics)   # plan, save (sync, background or async), commit, prune
    session.on_exception(exc)             # an exception escapes training: save a training state
    session.end()                         # put back what the fit replaced, release the directory

The session owns the rules: which checkpoint a fit resumes from (and the fallback when
the newest does not verify), when a step or time trigger saves, what a SIGTERM does (a
flag in the handler, a save at the next safe point, the old handler back, the signal
again), which exceptions save a training state, the warnings, and which errors the end
of a fit raises. The adapter's `Framework` does the framework's part (write, load, start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

from checkpoint_hooks.core.directory import Problem
from checkpoint_hooks.core.engine import Engine, Plan, SaveItem, Writer
from checkpoint_hooks.core.errors import CheckpointError, CorruptCheckpointError, MonitorError
from checkpoint_hooks.core.framework import Framework, ResumePoint
from checkpoint_hooks.core.paths import UnsafePathError, other_owner
from checkpoint_hooks.core.planner import SHARDED
from checkpoint_hooks.core.preemption import SigtermWatch
from checkpoint_hooks.core.records import Record
from checkpoint_hooks.core.resume_state import ResumeState, host_rng_state, set_host_rng_state
from checkpoint_hooks.core.store import is_url
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError

log = logging.getLogger("checkpoint_hooks")

Metrics = Mapping[str, Any]


@dataclass(frozen=True)
class Saved:
    """What an epoch end saved: the plan, and its records once committed (none yet in the background)."""

    plan: Plan
    records: tuple[Record, ...]
    background: bool


def show_info_logs() -> None:
    """Make `verbose=True` print, as the frameworks' own verbose callbacks do, with or without a logging setup.

    Where logging is configured (the root logger has handlers) our INFO records go there; where it
    is not, they go to stderr through a handler of our own.
    """
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not any(getattr(h, "checkpoint_hooks", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.checkpoint_hooks = True  # type: ignore[attr-defined]
        log.addHandler(handler)


class FitSession:
    """One fit of one framework under one policy (a callback keeps its session across fits).

    Args:
        policy: the checkpoint policy.
        framework: the adapter's `Framework`.
    """

    def __init__(self, policy: CheckpointPolicy, framework: Framework) -> None:
        self.policy = policy
        self.framework = framework
        self.engine: Engine | None = None
        self.resumed: ResumePoint | None = None
        self.preempted = False  # a SIGTERM or an exception stopped the current or latest fit
        self._sigterm = False
        self._watch: SigtermWatch | None = None
        self.watch: SigtermWatch | None = None  # the SIGTERM handler of the current or latest fit
        self._in_fit = False
        self._fits = 0
        self._run: str | None = None  # the run this session writes (it continues it in a later fit)
        self._epoch = 0
        self._epoch_step = 0
        self._epoch_done = False
        self._step = 0
        self._previous_step = 0
        self._batches = 0  # trained in this fit
        self._metrics: Metrics | Callable[[], Metrics] = {}
        self._due_at_epoch_end = False
        self._saving: Plan | None = None
        self._shared_in_flight = False  # a background save every rank takes part in (_save_together_later)
        self._warned: set[str] = set()

    # -- fit start --------------------------------------------------------------------

    def open(self) -> Engine:
        """Create the engine of this fit and lock its directory (once; `begin` calls it too)."""
        if self.engine is not None and self._in_fit:
            return self.engine
        self._close_quietly()
        fw = self.framework
        engine = Engine(
            self.policy,
            extensions=fw.extensions,
            default_format=fw.default_format,
            resumable_formats=fw.resumable_formats,
            epoch_base=fw.epoch_base,
            is_writer=fw.is_writer(),
            index_beside=fw.index_beside,
        )
        self.engine = engine
        if self.policy.verbose and engine.is_writer:
            show_info_logs()
        self._in_fit = True
        self._sigterm = self.preempted = False
        self._batches = self._epoch_step = self._step = self._previous_step = 0
        self._epoch_done = self._due_at_epoch_end = False
        self._warned.clear()
        try:
            engine.open()
        except BaseException:
            self.end(failing=True)
            raise
        return engine

    def begin(
        self,
        *,
        restore: str = "policy",
        is_current: Callable[[FrameType | None], bool] | None = None,
        on_stale: Callable[[], None] | None = None,
    ) -> ResumePoint | None:
        """Start the fit: choose and load the checkpoint to continue from, then watch for SIGTERM.

        Args:
            restore: "policy" loads what `policy.resume` says; "own_run" loads nothing and continues
                this session's run (a later fit() of the same callback: the model in memory is the
                newest state); "none" loads nothing (the framework restores a checkpoint the user
                named, and `engine.load_state_dict` adopts it when it is one of the directory's).
            is_current, on_stale: see `SigtermWatch` (for frameworks whose fit can end unseen).

        Returns:
            Where training continues (None: from the start).
        """
        engine = self.open()
        try:
            if restore not in ("policy", "own_run", "none"):
                raise ValueError(f"restore must be 'policy', 'own_run' or 'none'. Received: restore={restore!r}")
            point = None
            if restore == "own_run" and self._fits > 0:
                self._continue_own_run(engine)
            elif restore != "none":
                point = self._resume(engine)
            if not engine.run_decided:
                engine.start_fresh()
            if point is not None:
                self.framework.set_start(point)
                self._log_resume(point)
            self.resumed = point
            self._step = self._previous_step = point.step if point is not None else 0
            if engine.is_writer:
                self._run = engine.run
            self._fits += 1
            if self.policy.save_on_preemption and not self.framework.handles_sigterm:
                self._watch = self.watch = SigtermWatch(
                    on_signal=self._note_sigterm, is_current=is_current, on_stale=on_stale
                )
                self._watch.install()
        except BaseException:
            self.end(failing=True)
            raise
        return point

    def _continue_own_run(self, engine: Engine) -> None:
        engine.start()
        if engine.is_writer and self._run and engine.run != self._run:
            own = engine.manifest.run_records(self._run)
            if own:
                engine.adopt(own[-1], discard_newer=False)

    def _resume(self, engine: Engine) -> ResumePoint | None:
        resume = self.policy.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self._resume_newest(engine)
        return self._resume_path(engine, resume)

    def _resume_newest(self, engine: Engine) -> ResumePoint | None:
        """Load the newest resumable checkpoint, verifying its checksums while the framework loads it.

        Verifying first and loading after reads the file twice in a row; in parallel the two
        readers share the page cache. If the checksum fails (whether the load raised or not) the
        previous checkpoint is loaded instead, which replaces everything the bad one restored. A
        load error of a checkpoint that verifies is raised. Under several processes the writer
        verifies and tells the others to go on or to load the next one; a checkpoint every rank wrote
        part of (a folder) is verified by every rank, each a share of its files, and the ranks agree.
        """
        fw = self.framework
        if not engine.is_writer and not fw.broadcasts:
            # the writer's choice, read from the directory without the lock (`open` started the engine already)
            manifest = engine.directory.read_manifest()
            if manifest is None:
                return None
            engine.manifest = manifest
            record = engine.find_resume()
            return self._load(engine, record, engine.local_path(record, self._folder_urls)) if record is not None else None
        candidates: Iterator[Record] = iter(engine.resume_candidates() if engine.is_writer else [])
        skipped = 0  # checkpoints that did not verify (the writer counts them)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint_hooks-verify") as verifier:
            while True:
                record = next(candidates, None)
                if record is None and skipped and engine.is_writer:
                    log.warning(
                        "none of the %d checkpoint(s) to resume from in %s verifies: training starts from the "
                        "beginning, and they stay as they are", skipped, engine.directory.url,
                    )
                path, check = None, None
                foreign = self._foreign(engine, record) if record is not None else None
                if foreign is not None:
                    record = None
                elif record is not None:
                    try:
                        path = engine.local_path(record, self._folder_urls)  # a download from a remote store
                        check = verifier.submit(engine.problems, self._share(record))
                    except (OSError, UnsafePathError):  # a FIFO, a link, a lost download: verify says which
                        problems = engine.problems(record)
                        if not problems:
                            raise
                        engine.warn_skipped(record, problems)
                        skipped += 1
                        continue
                shared = fw.broadcast((path, record.to_json() if record is not None else None, foreign))
                if shared[2] is not None:
                    raise CheckpointError(shared[2])
                path, record = shared[0], Record.from_json(shared[1]) if shared[1] is not None else None
                if not path:
                    return None
                split = record is not None and self._verified_by_every_rank(record)
                if split and not engine.is_writer:
                    assert record is not None
                    check = verifier.submit(engine.problems, self._share(record))
                error: Exception | None = None
                point = None
                early = self._verify_before_load(engine, record)
                if not early:
                    try:
                        point = self._load(engine, record, path)
                    except Exception as exc:
                        error = exc
                problems = check.result() if check is not None else []
                problems += [p for p in early if p not in problems]
                verified = (not fw.any_rank(bool(problems))) if split else fw.broadcast(not problems)
                if verified:
                    if error is not None:
                        raise error
                    if engine.is_writer and record is not None:
                        engine.adopt(record)
                    return point
                if record is not None and problems:
                    engine.warn_skipped(record, problems)
                elif record is not None and split and engine.is_writer:
                    found = Problem(record.name, record.primary_path, "a file another rank verified does not verify")
                    engine.warn_skipped(record, [found])
                skipped += 1

    def _verify_before_load(self, engine: Engine, record: Record | None) -> list[Problem]:
        """What does not verify among the files of a folder checkpoint that loading unpickles as they are.

        The framework names them (an optional `verified_before_load`, names inside the folder: DCP's
        `.metadata`); they are small, and are checked here before anything is loaded, where the rest
        is verified while it loads.
        """
        names = getattr(self.framework, "verified_before_load", ())
        if record is None or record.folder is None or not names:
            return []
        files = tuple(f for f in record.files if f.path.rsplit("/", 1)[-1] in names)
        return engine.problems(replace(record, files=files)) if files else []

    @property
    def _folder_urls(self) -> bool:
        """Whether the framework loads a folder on a remote store from its URL (an optional `reads_folder_urls`)."""
        return bool(getattr(self.framework, "reads_folder_urls", False))

    def _verified_by_every_rank(self, record: Record) -> bool:
        """Whether each rank verifies a share of `record`: a folder every rank wrote part of, on a framework
        that knows its ranks (an optional `rank()`); otherwise the writer verifies every file."""
        return record.folder is not None and self.framework.world_size() > 1 and hasattr(self.framework, "rank")

    def _share(self, record: Record) -> Record:
        """The files of `record` this process verifies: every world_size-th from its rank, or all of them."""
        if not self._verified_by_every_rank(record):
            return record
        rank, world = self.framework.rank(), self.framework.world_size()  # type: ignore[attr-defined]
        return replace(record, files=record.files[rank::world])

    def _foreign(self, engine: Engine, record: Record) -> str | None:
        """Why `record` cannot be this framework's to resume from (another framework wrote it), or None."""
        extension = self.framework.extensions.get(record.format)
        if extension is None or record.primary_path.endswith(extension):
            return None
        return (
            f"{engine.directory.url} holds checkpoints another framework wrote ({record.primary_path!r}; "
            f"{self.framework.name} writes {extension} files); point dirpath at another directory, or set "
            "resume='never' to start a run of its own beside them"
        )

    def _resume_path(self, engine: Engine, given: str) -> ResumePoint | None:
        """Load the checkpoint `resume` names: one of the directory's (verified first), or any file."""
        choice: dict[str, Any] = {}
        if self._decides(engine):
            try:
                choice = self._choose_path(engine, given)
            except Exception as exc:
                if self.framework.world_size() <= 1:
                    raise
                choice = {"error": [type(exc).__name__, str(exc)]}
        choice = self.framework.broadcast(choice)
        if "error" in choice:
            kind, message = choice["error"]
            raise (PolicyError if kind == "PolicyError" else CheckpointError)(message)
        record = Record.from_json(choice["record"]) if choice.get("record") else None
        return self._load(engine, record, choice["path"])

    def _choose_path(self, engine: Engine, given: str) -> dict[str, Any]:
        fw = self.framework
        spellings = [given, *(given + ext for ext in dict.fromkeys(fw.extensions.values()))]
        record = next((r for r in map(engine.find_record, spellings) if r is not None), None)
        if record is not None:
            if record.format not in fw.resumable_formats:
                raise PolicyError(
                    f"resume={given!r} is a {record.format!r} checkpoint, which holds no optimizer state; resume "
                    "from a training_state checkpoint (the rolling last-epoch=... or a training_state save)"
                )
            problems = engine.problems(record)
            if problems:
                raise CorruptCheckpointError(
                    f"resume={given!r} does not verify: {'; '.join(str(p) for p in problems)}; "
                    "resume from another checkpoint or set resume='never'"
                )
            engine.adopt(record, discard_newer=False)
            return {"record": record.to_json(), "path": engine.local_path(record, self._folder_urls)}
        if is_url(given) or any(os.path.exists(p) for p in spellings):
            return {"path": given}
        raise PolicyError(
            f"resume must be 'auto', 'never' or an existing checkpoint; {given!r} does not exist. "
            f"Received: resume={given!r}"
        )

    def _load(self, engine: Engine, record: Record | None, path: str) -> ResumePoint:
        if not self.policy.trust_other_owners:
            files = [path]
            if record is not None and engine.store is not None and engine.store.is_local:
                files += [engine.store.join(entry.path) for entry in record.files]
            owner = next((uid for uid in map(other_owner, dict.fromkeys(files)) if uid is not None), None)
            if owner is not None:
                raise CheckpointError(
                    f"refusing to resume from {path!r}: it (or a file of it, or its folder) belongs to user id {owner}, not to this "
                    f"user ({os.geteuid()}), and loading a checkpoint can run code it holds. Set "
                    "trust_other_owners=True if you trust whoever wrote it, resume='never' to start fresh, or "
                    "another dirpath"
                )
        state = self.framework.load(path)
        if record is not None:
            return ResumePoint(path, record, record.epoch, record.step, record.mid_epoch, state)
        if state is None or state.epoch is None:
            return ResumePoint(path, None, None, state.step if state else 0, False, state)
        return ResumePoint(path, None, state.epoch, state.step, state.mid_epoch, state)

    def _log_resume(self, point: ResumePoint) -> None:
        fw = self.framework
        engine = self.engine
        level = engine.level if engine is not None else logging.DEBUG
        if point.epoch is None:
            log.log(level, "loaded %s; it does not say which epoch it ends, so training counts from the start", point.path)
            return
        shown = point.epoch + fw.epoch_base
        if point.mid_epoch and not fw.resumes_mid_epoch:
            seen = point.state.epoch_step if point.state is not None else None
            log.warning(
                "resumed from %s, saved during epoch %d at step %d; %s cannot skip batches, so epoch %d starts over "
                "from its first batch with the restored weights and trains on %s once more (the step count ends "
                "that much higher)",
                os.path.basename(point.path),
                shown,
                point.step,
                fw.name,
                shown,
                f"the {seen} batch(es) it had trained before the save" if seen is not None else "the batches before the save",
            )
            return
        if point.record is None:  # the engine named the directory's own checkpoint as it adopted it
            log.log(level, "resuming from %s (epoch %d, step %d)", point.path, shown, point.step)

    # -- random states ------------------------------------------------------------------

    def payload(self, item: SaveItem, rng: list[dict[str, Any]] | None = None, **extra: Any) -> ResumeState:
        """The resume payload of the item being saved: where training is, and the random states now.

        Args:
            item: the item being written.
            rng: the random states of every process, by rank (default: this process's).
            **extra: the adapter's own fields.
        """
        plan = self._saving
        epoch, step = (plan.epoch, plan.step) if plan is not None else (self._epoch, self._step)
        return ResumeState(
            epoch=epoch,
            step=step,
            mid_epoch=item.mid_epoch,
            epoch_step=self._epoch_step if item.mid_epoch else None,
            rng=rng if rng is not None else [self.rng_state()],
            extra=dict(extra),
        )

    def rng_state(self) -> dict[str, Any]:
        """This process's random states: Python's, NumPy's and the framework's."""
        return {**host_rng_state(), **self.framework.rng_state()}

    def restore_rng(self, state: ResumeState | None, rank: int = 0) -> None:
        """Set this process's random states to those `state` saved for `rank`."""
        saved = state.rng_of(rank) if state is not None else None
        if saved:
            set_host_rng_state(saved)
            self.framework.set_rng_state(saved)

    # -- during training ----------------------------------------------------------------

    def epoch_begin(self, epoch: int, step: int | None = None) -> None:
        """An epoch starts.

        Args:
            epoch: the 0-based epoch.
            step: the global step now, for a framework that restores its progress itself after
                `begin` (Lightning from a user's ckpt_path): step triggers count from it.
        """
        self._epoch = epoch
        self._epoch_step = 0
        self._epoch_done = False
        if step is not None:
            self._step = self._previous_step = step

    def batch_end(
        self,
        step: int,
        *,
        batches: int = 1,
        last_batch: bool = False,
        metrics: Metrics | Callable[[], Metrics] | None = None,
        can_save: bool = True,
    ) -> None:
        """A safe point after a training batch: act on SIGTERM, then on a step or time trigger.

        Args:
            step: the global optimizer step now.
            batches: how many batches ran since the last call (Keras's steps_per_execution).
            last_batch: the epoch's last batch (its epoch end saves anyway).
            metrics: what a save here records (a mapping, or a callable that makes one).
            can_save: False where a save here would hold unfinished work (an open gradient accumulation).
        """
        self._step = step
        self._batches += batches
        self._epoch_step += batches
        self._epoch_done = self._epoch_done or last_batch
        if metrics is not None:
            self._metrics = metrics
        if self.stop_requested():
            self.stop_for_preemption()
            return
        previous, self._previous_step = self._previous_step, step
        policy = self.policy
        engine = self.engine
        if engine is None or not can_save or (policy.every_n_steps is None and policy.every_n_minutes is None):
            return
        due = None
        if self._decides(engine):
            every = policy.every_n_steps
            # a step can move by more than one between calls: a multiple crossed counts
            by_steps = every is not None and step // every > previous // every and engine.step_due(step - step % every)
            due = by_steps or engine.time_due()
        if not self.framework.broadcast(due):
            return
        if self._epoch_done:
            self._due_at_epoch_end = True  # the epoch's own save follows; it makes sure a training state is in it
            return
        self.save_training_state(mid_epoch=True)

    def _decides(self, engine: Engine) -> bool:
        """Whether this process plans saves: the writer, or every process of a framework that cannot broadcast
        (there the others plan alike and write into scratch files, as a collective save may need them to)."""
        return engine.is_writer or not self.framework.broadcasts

    def stop_requested(self) -> bool:
        """Whether a SIGTERM came (on any process, where the processes agree at each safe point)."""
        fw = self.framework
        if self.policy.save_on_preemption and not fw.handles_sigterm and fw.world_size() > 1:
            return fw.any_rank(self._sigterm)
        return self._sigterm

    def epoch_end(
        self,
        epoch: int,
        step: int,
        metrics: Metrics,
        *,
        adjust: Callable[[Plan], Plan] | None = None,
        background: bool | Callable[[Plan], bool] | None = None,
    ) -> Saved:
        """Save what the policy asks for at this epoch end.

        Args:
            epoch: the 0-based epoch that ended.
            step: the global step.
            metrics: the epoch's logged metrics.
            adjust: changes the plan before it is saved (a framework's own threshold).
            background: save in the background (default: `policy.async_save`); a callable decides from the plan.
        """
        engine = self._require_engine()
        self._epoch, self._step, self._epoch_done = epoch, step, True
        self._metrics = metrics
        plan = self._ranked_plan(engine, epoch, step, metrics, mid_epoch=False)
        if adjust is not None:
            plan = adjust(plan)
        due, self._due_at_epoch_end = self._due_at_epoch_end, False
        resumable = self.framework.resumable_formats
        if due and not any(item.format in resumable and "last" in item.roles for item in plan.items):
            # a step or time trigger on the epoch's last batch, with last=False: a training state of its own
            extra = engine.plan_training_state(epoch, step, metrics, mid_epoch=False) if self._decides(engine) else None
            extra = self.framework.broadcast(extra)
            assert extra is not None
            plan = Plan(plan.epoch, plan.step, plan.metrics, plan.items + extra.items)
        return self.save(plan, background=background(plan) if callable(background) else background)

    def within_epoch(self, epoch: int, step: int, metrics: Metrics, *, background: bool | None = None) -> Saved:
        """A save point inside an epoch ranked as an epoch end is (Lightning's validation every N batches, its
        every_n_train_steps): the top-k rule and the rolling last apply, snapshots do not; its items are mid-epoch.

        Args:
            epoch: the 0-based epoch it falls in.
            step: the global step.
            metrics: the logged metrics now.
            background: save in the background (default: `policy.async_save`).
        """
        engine = self._require_engine()
        self._step, self._metrics = step, metrics
        return self.save(self._ranked_plan(engine, epoch, step, metrics, mid_epoch=True), background=background)

    def _ranked_plan(self, engine: Engine, epoch: int, step: int, metrics: Metrics, *, mid_epoch: bool) -> Plan:
        """The writer's plan under the top-k, snapshot and last rules, the same on every process."""
        self._wait_for_shared(engine)
        plan = engine.plan(epoch, step, metrics, mid_epoch=mid_epoch) if self._decides(engine) else None
        plan = self.framework.broadcast(plan)
        assert plan is not None
        return plan

    def check_monitor(self, metrics: Metrics, *, strict: bool) -> bool:
        """Whether the monitored metric is logged; raise MonitorError (`strict`) or warn once when not."""
        engine = self._require_engine()
        try:
            engine.require_monitor(metrics)
        except MonitorError as exc:
            if strict:
                raise
            self.warn_once("monitor", "%s; skipping top-k until it appears", exc)
            return False
        return True

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        """Log a warning once per fit."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def save_training_state(self, *, mid_epoch: bool, preempted: bool = False, epoch: int | None = None) -> Saved:
        """A training state outside the epoch-end rules (a trigger, or preemption): the rolling last.

        A save on preemption is made on this thread (on disk before the process ends).

        Args:
            mid_epoch: saved before the epoch finished.
            preempted: tag it preempted.
            epoch: the epoch it belongs to (default: the current one).
        """
        engine = self._require_engine()
        self._wait_for_shared(engine)
        values = self._metrics() if callable(self._metrics) else self._metrics
        epoch = self._epoch if epoch is None else epoch
        plan = None
        if self._decides(engine):
            plan = engine.plan_training_state(epoch, self._step, values, mid_epoch=mid_epoch, preempted=preempted)
        plan = self.framework.broadcast(plan)
        assert plan is not None
        return self.save(plan, background=False if preempted else None)

    def save(self, plan: Plan, *, background: bool | None = None) -> Saved:
        """Save `plan`: on this thread, or in the background (`policy.async_save`), one save in flight.

        In the background the framework's `snapshot` copies the state to host memory here and a
        worker writes it; items it cannot copy are written here and only the rest runs in the worker.
        """
        engine = self._require_engine()
        fw = self.framework
        if background is None:
            background = self.policy.async_save
        self._saving = plan
        try:
            if any(item.format == SHARDED for item in plan.items) and fw.world_size() > 1:
                self._wait_for_shared(engine)
                apart = getattr(fw, "background_collectives", None)
                if background and apart is not None and all(fw.can_snapshot(item) for item in plan.items):
                    return self._save_together_later(engine, plan, apart)
                return self._save_together(engine, plan, fw.write)
            if background and plan and all(fw.can_snapshot(item) for item in plan.items):
                engine.execute_async(plan, fw.snapshot, fw.write_snapshot, fw.buffers)
                return Saved(plan, (), True)
            records = engine.execute(plan, fw.write, background=background)
        finally:
            self._saving = None
        return Saved(plan, tuple(records), background)

    def _save_together(self, engine: Engine, plan: Plan, write: Writer) -> Saved:
        """A save every rank writes part of, here and now, failed on every rank when it failed on one.

        The writer's commit is the last step that can fail; the ranks then agree on the outcome, so a
        failure raises SaveError on every rank (or only warns everywhere, with on_save_error='warn').
        """
        error: Exception | None = None
        records: list[Record] = []
        try:
            records = engine.execute_here(plan, write)
        except Exception as exc:
            error = exc
        # the writer's transaction returns no records after a failure it only warned about
        if not self.framework.any_rank(error is not None or (engine.is_writer and not records)):
            return Saved(plan, tuple(records), False)
        if error is not None or not engine.is_writer:  # the writer's transaction warned already
            engine.fail(plan, error if error is not None else OSError("another rank failed to save it"))
        return Saved(plan, (), False)

    def _save_together_later(
        self, engine: Engine, plan: Plan, apart: Callable[[], contextlib.AbstractContextManager[Any]]
    ) -> Saved:
        """A save every rank writes part of, in the background on every rank (`policy.async_save`).

        Each rank copies its state here (`snapshot`; a copy that fails on one rank fails the save on
        every rank, here). Its save worker writes the copy and the writer commits, with the ranks'
        collectives apart from training's (`apart`, the framework's `background_collectives`). The
        outcome, agreed by the ranks, surfaces at the next save or plan, or at the end of the fit, on
        every rank alike.
        """
        fw = self.framework
        copies: dict[str, Any] = {}
        error: Exception | None = None
        try:
            for item in plan.items:
                copies[item.name] = fw.snapshot(item)
        except Exception as exc:  # host memory, say: the ranks agree before any worker waits for the others
            error = exc
        if fw.any_rank(error is not None):
            engine.fail(plan, error if error is not None else OSError("another rank could not copy its part"))
            return Saved(plan, (), False)

        def write(item: SaveItem, path: str) -> None:
            fw.write_snapshot(item, copies[item.name], path)

        def job() -> Saved:
            with apart():
                return self._save_together(engine, plan, write)

        engine.execute_in_background(job)
        self._shared_in_flight = True
        return Saved(plan, (), True)

    def _wait_for_shared(self, engine: Engine) -> None:
        """On every rank, before a plan or a save: the background save every rank takes part in is over.

        Its error (the same on every rank) is raised here by every rank, before any of them plans.
        """
        if self._shared_in_flight:
            self._shared_in_flight = False
            engine.wait()

    # -- preemption and exceptions ------------------------------------------------------

    def _note_sigterm(self) -> None:
        self._sigterm = True  # saving inside the handler could interrupt a training step: only mark it

    @property
    def signal_ends_process(self) -> bool:
        """Whether SIGTERM, raised again after the save, takes its default course (ends the process)."""
        return self._watch is not None and self._watch.previous == signal.SIG_DFL

    def stop_for_preemption(self) -> None:
        """At a safe point after SIGTERM: save a preempted training state, stop, and let SIGTERM end the process.

        The signal is raised again with the handler that was there before the fit; if a handler of
        the user's takes it and returns, the framework is asked to stop and training ends early.
        """
        self._sigterm = False
        engine = self.engine
        writer = engine is not None and engine.is_writer
        log.warning(
            "SIGTERM received; saving a training state to resume from before the process ends"
            if writer
            else "SIGTERM received (by this process or another); stopping once the writer saved a training state"
        )
        error = self._save_preempted()
        if self.framework.world_size() > 1:
            self.framework.any_rank(False)  # the writer saves; the others must not end the job before it is done
        self.framework.request_stop()
        watch = self._watch
        self.end(failing=True)
        if watch is not None:
            signal.raise_signal(signal.SIGTERM)
        # Still here: a handler of the user's took the signal and returned; the framework stops soon.
        if error is not None:
            raise error

    def should_save_on(self, exc: BaseException) -> bool:
        """Whether an exception escaping training saves a training state first.

        Not for the checkpointing's own errors, not before a batch of this fit was trained, and under
        several processes only for SIGTERM (which every process receives): after an error on one
        process, a save would wait for the others forever.
        """
        if not self.policy.save_on_preemption or self.engine is None or not self._in_fit or self.preempted:
            return False
        if isinstance(exc, (CheckpointError, PolicyError)) or self._batches == 0:
            return False
        sigterm = type(exc).__name__ == "SIGTERMException"
        return sigterm or self.framework.world_size() <= 1

    def on_exception(self, exc: BaseException) -> None:
        """An exception escapes training: save a preempted training state (when it should), then end the fit.

        Never raises: the exception on its way is the one to see.
        """
        try:
            if self.should_save_on(exc):
                log.warning("%s stopped training; saving a training state to resume from", type(exc).__name__)
                error = self._save_preempted()
                if error is not None:
                    log.error("could not save a training state after %s: %s", type(exc).__name__, error)
        finally:
            self.end(failing=True)

    def _save_preempted(self) -> Exception | None:
        """The training state tagged preempted, made on this thread; returns its error instead of raising."""
        engine = self.engine
        if engine is None or self.preempted:
            return None
        self.preempted = True
        try:
            engine.wait()
        except Exception as exc:  # a background save failed: the one on preemption goes ahead
            log.error("%s", exc)
        if self._batches == 0:
            log.log(engine.level, "no training step in this fit: nothing to save on preemption")
            return None
        last = engine.last_record if engine.is_writer else None
        if self.framework.broadcast(last is not None and last.run == engine.run and last.step == self._step):
            log.warning("nothing trained since the training state %s was saved; it is the resume point",
                        last.name if last is not None else f"of step {self._step}")
            return None
        # between epochs the state is that of the last finished one
        finished = self._epoch_done or self._epoch_step == 0
        epoch = self._epoch - 1 if finished and not self._epoch_done else self._epoch
        try:
            self.save_training_state(mid_epoch=not finished, preempted=True, epoch=epoch)
        except Exception as exc:
            return exc
        return None

    # -- end --------------------------------------------------------------------------

    def end(self, *, failing: bool = False) -> None:
        """Put back what the fit replaced and release the directory; safe to call more than once.

        A background save still running is waited for. Its error is raised at a normal end, and
        only logged when another exception (`failing`) or a SIGTERM is ending the fit already.
        A SIGTERM that found no safe point to stop at is raised again here, never dropped.
        """
        self._in_fit = False
        self._shared_in_flight = False  # closing the engine waits for it
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.restore()
        error: Exception | None = None
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception as exc:
                error = exc
        sigterm, self._sigterm = self._sigterm, False
        if error is not None and (failing or sigterm):
            log.error("%s", error)
        if sigterm:
            self.preempted = True
            signal.raise_signal(signal.SIGTERM)
        if error is not None and not failing:
            raise error

    def _close_quietly(self) -> None:
        """End what an earlier fit left open (one that raised where no hook ran); its errors are logged."""
        if self._in_fit or self._watch is not None:
            self.end(failing=True)
        elif self.engine is not None:
            try:
                self.engine.close()
            except Exception as exc:
                log.error("%s", exc)

    # -- what the run kept ----------------------------------------------------------------

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise CheckpointError("the checkpoint session has not begun; the callback must be passed to fit()")
        return self.engine

    def note_complete(self, epochs: int | None) -> bool:
        """Warn, and return True, when a resumed run has no epoch left of `epochs` (a finished script run again)."""
        point, engine = self.resumed, self.engine
        if epochs is None or point is None or engine is None or not engine.is_writer or point.start_epoch < epochs:
            return False
        best = self.best_model_path or (point.path if point.record is None else engine.path_of(point.record))
        log.warning(
            "training already completed %d epoch(s) in %s; nothing is left to train. The best checkpoint is %s. "
            "Ask for more epochs, or set resume='never' or another dirpath to train again",
            epochs,
            engine.directory.url,
            best,
        )
        return True

    @property
    def best_model_path(self) -> str:
        return self.engine.best_model_path if self.engine is not None else ""

    @property
    def best_model_score(self) -> float | None:
        return self.engine.best_model_score if self.engine is not None else None

    @property
    def last_model_path(self) -> str:
        return self.engine.last_model_path if self.engine is not None else ""

    def best_score(self) -> float | None:
        """The committed best monitored value (NaN included); None before the first."""
        engine = self.engine
        record = engine.best_record if engine is not None else None
        return record.score(self.policy.monitor) if record is not None else None


class KeptCheckpoints:
    """What the run kept, as every adapter shows it: read from its `session` attribute (None before one)."""

    def _kept(self) -> FitSession | None:
        session = getattr(self, "session", None)
        return session if isinstance(session, FitSession) else None

    @property
    def best_model_path(self) -> str:
        """Path of the best checkpoint's primary file ('' before the first save)."""
        session = self._kept()
        return session.best_model_path if session is not None else ""

    @property
    def best_model_score(self) -> float | None:
        session = self._kept()
        return session.best_model_score if session is not None else None

    @property
    def last_model_path(self) -> str:
        """Path of the rolling last checkpoint ('' before the first save)."""
        session = self._kept()
        return session.last_model_path if session is not None else ""
