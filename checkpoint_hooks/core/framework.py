"""The small interface an adapter implements so that `FitSession` can run a fit of its framework.

A `Framework` says what its files are called, who writes, how to save one item, how
to copy the state for a background save, how to load a checkpoint, where training
starts, how to stop, and how to read and set its own random generators. Everything
else (resume choice, triggers, preemption, exceptions, warnings) is the session's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from checkpoint_hooks.core.buffers import HostBuffers
from checkpoint_hooks.core.engine import SaveItem
from checkpoint_hooks.core.records import Record
from checkpoint_hooks.core.resume_state import ResumeState

T = TypeVar("T")


@dataclass(frozen=True)
class ResumePoint:
    """Where a fit continues: the checkpoint loaded, and the epoch and step it was saved at.

    Args:
        path: the local path of the file the framework loaded.
        record: its record when it is one of the directory's checkpoints (None for a file given by path).
        epoch: the 0-based epoch it was saved in; None when the file does not say.
        step: the global (optimizer) step it was saved at.
        mid_epoch: saved before `epoch` finished.
        state: the resume payload the file holds (None for a file without one).
    """

    path: str
    record: Record | None
    epoch: int | None
    step: int
    mid_epoch: bool
    state: ResumeState | None = field(default=None, repr=False)

    @property
    def start_epoch(self) -> int:
        """The first epoch to train: the interrupted one again, or the one after the finished one."""
        if self.epoch is None:
            return 0
        return self.epoch if self.mid_epoch else self.epoch + 1


@runtime_checkable
class Framework(Protocol):
    """What an adapter tells `FitSession` about its framework.

    Attributes:
        name: shown in messages ("Lightning", "Keras", ...).
        extensions: the file extension of each format it can write.
        default_format: the format used when the policy leaves `format` unset.
        resumable_formats: the formats a fit can resume from.
        epoch_base: added to 0-based epochs in names and messages (Keras counts from 1).
        resumes_mid_epoch: whether a mid-epoch checkpoint continues at its batch (else its epoch starts over).
        handles_sigterm: the framework turns SIGTERM into an exception itself (no handler of ours).
        broadcasts: whether `broadcast` reaches the other processes; where it cannot, they read the
            writer's choice of checkpoint from the directory.
        buffers: host arrays background snapshots copy into, kept from save to save (None: no async copies).
        index_beside: a new local directory keeps its index beside it (`core.layout`), leaving the
            directory to the checkpoint files, as the framework's own callback does.

    A framework whose ranks write parts of one checkpoint (a folder) may also define `rank()`, this
    process's rank among `world_size()`: each rank then verifies a share of such a checkpoint's files
    on resume, instead of the writer all of them. With `reads_folder_urls = True` such a checkpoint on
    a remote store is not downloaded: `load` gets its URL, where every rank reads its own part.
    `verified_before_load`, names of files inside such a folder that loading unpickles as they are
    (DCP's `.metadata`), has them verified before the checkpoint is loaded, not while it loads.
    With `background_collectives()`, a context manager in which this thread's collectives run apart
    from training's, such a checkpoint can be saved in the background (`async_save`): every rank
    copies its part with `snapshot`, and a worker on every rank writes it and agrees on the outcome.
    """

    # read-only: an adapter may give plain class attributes of narrower types
    @property
    def name(self) -> str: ...
    @property
    def extensions(self) -> Mapping[str, str]: ...
    @property
    def default_format(self) -> str: ...
    @property
    def resumable_formats(self) -> frozenset[str]: ...
    @property
    def epoch_base(self) -> int: ...
    @property
    def resumes_mid_epoch(self) -> bool: ...
    @property
    def handles_sigterm(self) -> bool: ...
    @property
    def broadcasts(self) -> bool: ...
    @property
    def buffers(self) -> HostBuffers[Any] | None: ...
    @property
    def index_beside(self) -> bool: ...

    def is_writer(self) -> bool:
        """Whether this process writes checkpoints (rank zero, the chief)."""

    def world_size(self) -> int:
        """How many processes train together."""

    def broadcast(self, value: T) -> T:
        """The writer's `value` on every process (the value itself in a single process)."""

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a collective: every process calls it)."""

    def write(self, item: SaveItem, path: str) -> None:
        """Save `item` in its format at `path` (called on every process; only the writer's file is kept)."""

    def can_snapshot(self, item: SaveItem) -> bool:
        """Whether `snapshot` can copy what `write` saves for `item`, so a worker thread can write it."""

    def snapshot(self, item: SaveItem) -> Any:
        """A copy in host memory of what `write` would save for `item`, into `buffers` where it can."""

    def write_snapshot(self, item: SaveItem, snapshot: Any, path: str) -> None:
        """Write what `snapshot` copied at `path` (in a worker thread)."""

    def load(self, path: str) -> ResumeState | None:
        """Restore model, optimizer and schedules from the checkpoint at `path`; its resume payload, if any.

        A later `load` replaces everything an earlier one restored (resume falls back to an older
        checkpoint when the newer one fails verification).
        """

    def set_start(self, point: ResumePoint) -> None:
        """Make training begin at `point.start_epoch` (and, where it can, at the batch after `point.step`)."""

    def request_stop(self) -> None:
        """Ask the training loop to stop at its next chance."""

    def rng_state(self) -> dict[str, Any]:
        """The framework's own random generator states (CPU and devices), as plain data."""

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `rng_state` returned (values from older files too)."""
