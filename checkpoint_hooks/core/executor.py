"""Where and when a save runs: on the training thread, or in one low-priority worker thread.

Three ways, one entry point (`Executor.submit`):

* sync: the whole transaction on the calling thread;
* background: the adapter's writer on the calling thread (the framework's state cannot
  change mid-write), hashing, fsync, publishing, the commit and pruning in the worker;
* async: only a snapshot (a copy of the state in host memory) on the calling thread,
  writing and the rest in the worker.

At most one save is in flight: every submit, and every plan, waits for the previous one,
so retention always decides on what is committed and a save's error surfaces at the next
call. Host buffers that snapshots copy into are recycled once that wait is over and let
go at `close()`; the executor is where the end of the save in flight is known.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from checkpoint_hooks.core import scratch as scratch_folders
from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.planner import Plan, SaveItem, Writer
from checkpoint_hooks.core.records import Record
from checkpoint_hooks.core.store import Store
from checkpoint_hooks.core.transaction import CurrentItem, stage_item

# The background save thread's nice value (Linux): it takes the CPU time training leaves idle.
WORKER_NICENESS = 19

Snapshot = Callable[[SaveItem], Any]
SnapshotWriter = Callable[[SaveItem, Any, str], None]


class RunHost(Protocol):
    """What the executor needs of the engine: whether this process writes, and a run to save into."""

    @property
    def is_writer(self) -> bool: ...
    @property
    def store(self) -> Store | None: ...
    @property
    def run_decided(self) -> bool: ...
    def start_fresh(self) -> None: ...


class Executor:
    """Runs saves one at a time, on the calling thread or in a worker thread.

    Args:
        host: the engine (which process writes, the store, the run).
        save: runs one plan's transaction on the current thread; returns the committed records.
        fail: reports a save that failed before its transaction started (raise, or warn).
        current: told which item is being written or snapshotted.
    """

    def __init__(
        self,
        host: RunHost,
        save: Callable[[Plan, Writer], list[Record]],
        fail: Callable[[Plan, Exception], None],
        current: CurrentItem,
    ) -> None:
        self._host = host
        self._save = save
        self._fail = fail
        self._current = current
        self.worker: ThreadPoolExecutor | None = None
        self.inflight: Future[list[Record]] | None = None
        self.buffers: HostBuffers[Any] | None = None  # what background snapshots copy into

    def submit(
        self,
        plan: Plan,
        write: Writer | None = None,
        snapshot: Snapshot | None = None,
        write_snapshot: SnapshotWriter | None = None,
        background: bool = False,
        buffers: HostBuffers[Any] | None = None,
    ) -> list[Record]:
        """Save `plan`: sync by default, background with `background=True`, async with `snapshot`.

        Returns the committed records of a sync save; [] otherwise (the worker commits later).
        Processes that do not write still call the writer (or snapshot): some frameworks
        gather state collectively.

        Args:
            plan: what to save.
            write: `write(item, path)`, for a sync or background save.
            snapshot: `snapshot(item)`, a copy of the item's state; makes the save async.
            write_snapshot: `write_snapshot(item, copy, path)`, run in the worker for an async save.
            background: write here, finish in the worker.
            buffers: the arrays `snapshot` copies into, recycled once the previous save is over.
        """
        if snapshot is None and write is None:
            raise ValueError(
                "submit needs write=, or snapshot= with write_snapshot=. Received: write=None, snapshot=None"
            )
        if snapshot is not None and (write_snapshot is None or background):
            raise ValueError(
                "an async save (snapshot=) needs write_snapshot= and runs in the worker already. "
                f"Received: write_snapshot={write_snapshot!r}, background={background!r}"
            )
        self.wait()
        if not plan:
            return []
        if buffers is not None:
            buffers.recycle()
            self.buffers = buffers
        host = self._host
        if not host.run_decided:
            host.start_fresh()
        if snapshot is not None:
            assert write_snapshot is not None
            self._snapshot_then_write(plan, snapshot, write_snapshot)
            return []
        assert write is not None
        if not background or not host.is_writer:
            return self.save_here(plan, write)
        self._write_then_finish(plan, write)
        return []

    def save_here(self, plan: Plan, write: Writer) -> list[Record]:
        """Save `plan` on this thread now, whatever is in flight: the writer's transaction; on every other
        process `write` into scratch files (a collective save needs every process to write)."""
        if not self._host.run_decided:
            self._host.start_fresh()
        if not self._host.is_writer:
            with scratch_folders.temporary("rank") as scratch:
                for item in plan.items:
                    write(item, os.path.join(scratch, item.filename))
            return []
        return self._save(plan, write)

    def submit_job(self, job: Callable[[], Any]) -> None:
        """Run `job` in the worker on this process, writer or not (a save every process takes part in).

        It is the save in flight: `wait`, the next submit and `close` wait for it and raise its error.
        """
        self.wait()
        self.inflight = self._start_worker().submit(job)

    def _snapshot_then_write(self, plan: Plan, snapshot: Snapshot, write: SnapshotWriter) -> None:
        payloads: dict[str, Any] = {}
        for item in plan.items:
            with self._current.writing(item):  # a framework's state_dict hooks may ask which record this becomes
                payloads[item.name] = snapshot(item)
        if self._host.is_writer:
            self._in_worker(plan, lambda item, path: write(item, payloads[item.name], path))

    def _write_then_finish(self, plan: Plan, write: Writer) -> None:
        """Write the items into staging now; the worker moves them into its own staging and goes on."""
        store = self._host.store
        assert store is not None
        stack = contextlib.ExitStack()
        prewritten = stack.enter_context(store.staging())
        try:
            for index, item in enumerate(plan.items):
                stage_item(prewritten, index, item, write, self._current, to_disk=False)
        except Exception as exc:
            stack.close()
            self._fail(plan, exc)
            return
        positions = {item.name: index for index, item in enumerate(plan.items)}

        def move(item: SaveItem, path: str) -> None:
            folder = os.path.join(prewritten, str(positions[item.name]))
            for entry in os.listdir(folder):  # a rename: the bytes were written on the training thread
                os.replace(os.path.join(folder, entry), os.path.join(os.path.dirname(path), entry))

        self._in_worker(plan, move, stack.close)

    def _in_worker(self, plan: Plan, write: Writer, cleanup: Callable[[], Any] | None = None) -> None:
        """Run the save in the single worker thread; `cleanup` runs after it, whatever happens."""

        def run() -> list[Record]:
            try:
                return self._save(plan, write)
            finally:
                if cleanup is not None:
                    cleanup()

        self.inflight = self._start_worker().submit(run)

    def _start_worker(self) -> ThreadPoolExecutor:
        if self.worker is None:
            self.worker = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="checkpoint_hooks-save", initializer=_lower_priority
            )
        return self.worker

    def wait(self) -> None:
        """Wait for the save in flight, if any, and raise its error."""
        inflight, self.inflight = self.inflight, None
        if inflight is not None:
            inflight.result()

    def close(self) -> None:
        """Stop the worker (after the save in flight) and let the host buffers go."""
        if self.worker is not None:
            self.worker.shutdown(wait=True)
            self.worker = None
        if self.buffers is not None:
            self.buffers.clear()  # the saves are over: the state's copy need not stay in memory
            self.buffers = None


def _lower_priority() -> None:
    """Run the calling thread at the lowest CPU priority, where threads have their own (Linux).

    On two cores a save's pickling, hashing and bookkeeping otherwise take a core from the
    framework's compute threads in the middle of an epoch. Threads it starts inherit it.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
