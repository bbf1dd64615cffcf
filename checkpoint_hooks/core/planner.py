"""What a save writes, decided before anything is written: the items of an epoch end or of a training-state save.

Planning is kept apart from writing so that an adapter can see the plan (and skip the
framework's work when it is empty) before it hands over a writer, and so that the step
and time triggers live next to the rules they complement. The planner reads the engine
live through `PlanHost`: the policy can be replaced mid-fit (Keras settles `mode` once
its compiled metrics exist), and the run and the index change with every save.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from checkpoint_hooks.core import retention
from checkpoint_hooks.core.errors import MonitorError
from checkpoint_hooks.core.manifest import Manifest
from checkpoint_hooks.core.naming import format_name, unique_name
from checkpoint_hooks.core.records import BEST, LAST, PREEMPTED
from checkpoint_hooks.policy import CheckpointPolicy, short_repr

log = logging.getLogger("checkpoint_hooks")

TRAINING_STATE = "training_state"
SHARDED = "sharded"  # a training state as a folder every rank writes its shards into
LAST_TEMPLATE = "last-epoch={epoch:03d}-step={step}"
PREEMPTED_TEMPLATE = "preempted-epoch={epoch:03d}-step={step}"


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
    """The checkpoints one save writes; an empty plan (falsy) writes nothing and the adapter skips its work."""

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
        if isinstance(value, (str, bytes)):
            continue  # float("0.5") would rank a text
        try:
            clean[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return clean


class PlanHost(Protocol):
    """What planning reads from the engine at each call."""

    @property
    def policy(self) -> CheckpointPolicy: ...
    @property
    def format(self) -> str: ...
    @property
    def extensions(self) -> Mapping[str, str]: ...
    @property
    def resumable_formats(self) -> frozenset[str]: ...
    @property
    def epoch_base(self) -> int: ...
    @property
    def manifest(self) -> Manifest: ...
    @property
    def run(self) -> str: ...


class Planner:
    """Decides the items of each save, and when the step and time triggers are due.

    Args:
        host: the engine whose policy, formats, index and run the plans follow.
    """

    def __init__(self, host: PlanHost) -> None:
        self._host = host
        # Metrics logged on some epoch: a name template may use them on epochs that lack them.
        self.seen_metrics: set[str] = set()
        self.last_save_time = time.monotonic()
        self.last_saved_step = -1
        self.warned_not_number = False  # the monitored value came as something else than a number

    def observe(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The epoch end's metrics as floats, remembered for the names of later saves."""
        values = clean_metrics(metrics)
        self.seen_metrics.update(values)
        monitor = self._host.policy.monitor
        if monitor is not None and monitor in metrics and monitor not in values and not self.warned_not_number:
            self.warned_not_number = True
            received = metrics[monitor]
            log.warning(
                "the monitored %r is a %s, not a number (received %s); this epoch is not ranked. Log a "
                "scalar (a float, or a 0-d or one-element tensor)",
                monitor,
                type(received).__name__,
                short_repr(received, 80),
            )
        return values

    def monitored_value(self, metrics: Mapping[str, float]) -> float | None:
        monitor = self._host.policy.monitor
        return None if monitor is None else metrics.get(monitor)

    def require_monitor(self, metrics: Mapping[str, Any]) -> None:
        """Raise MonitorError naming the keys that do appear when the monitor is missing."""
        monitor = self._host.policy.monitor
        if monitor is not None and monitor not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            close = difflib.get_close_matches(monitor, sorted(map(str, metrics)), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MonitorError(
                f"monitor={monitor!r} is not among the logged metrics ({available}); "
                f"log it, or set monitor to one of those{hint}"
            )

    def epoch_end(self, epoch: int, step: int, values: Mapping[str, float], *, mid_epoch: bool = False) -> Plan:
        """What this epoch end saves. A missing monitored value skips the top-k rule for this epoch only.

        Args:
            epoch: the 0-based epoch that ended.
            step: the global step.
            values: the epoch's metrics, from `observe`.
            mid_epoch: a save point inside `epoch` ranked like an epoch end (a validation there): no snapshot,
                and its items are marked mid-epoch.
        """
        host = self._host
        policy, fmt = host.policy, host.format
        holders = host.manifest.holders(host.run, BEST)
        roles = retention.plan_save(policy, holders, epoch, self.monitored_value(values), mid_epoch=mid_epoch)
        if not roles:
            return Plan(epoch, step, values)
        namer = self._namer(epoch, step, values)
        items: list[SaveItem] = []
        wanted = roles.names()
        if fmt in host.resumable_formats:
            items.append(namer(policy.filename_template, fmt, wanted))
        else:
            # A format a run cannot resume from still gets a training_state to resume with, as the last.
            if wanted - {LAST}:
                items.append(namer(policy.filename_template, fmt, wanted - {LAST}))
            if roles.last:
                items.append(namer(LAST_TEMPLATE, TRAINING_STATE, frozenset({LAST})))
        if mid_epoch:
            items = [replace(item, mid_epoch=True) for item in items]
        return Plan(epoch, step, values, tuple(items))

    def training_state(
        self, epoch: int, step: int, metrics: Mapping[str, Any], *, mid_epoch: bool, preempted: bool = False
    ) -> Plan:
        """One training_state outside the epoch-end rules: it becomes the rolling last (the resume point).

        Args:
            epoch: the epoch it is saved in.
            step: the global step.
            metrics: the metrics logged so far.
            mid_epoch: whether that epoch had not finished.
            preempted: a save on preemption: tagged and named as such.
        """
        values = clean_metrics(metrics)
        roles = frozenset({LAST, PREEMPTED} if preempted else {LAST})
        template = PREEMPTED_TEMPLATE if preempted else LAST_TEMPLATE
        fmt = SHARDED if self._host.format == SHARDED else TRAINING_STATE  # a sharded state is one whole
        item = self._namer(epoch, step, values)(template, fmt, roles)
        return Plan(epoch, step, values, (replace(item, mid_epoch=mid_epoch),))

    def step_due(self, step: int) -> bool:
        """Whether `every_n_steps` asks for a save at this global step."""
        every = self._host.policy.every_n_steps
        return every is not None and step > 0 and step % every == 0 and step != self.last_saved_step

    def time_due(self, now: float) -> bool:
        """Whether `every_n_minutes` passed since the last save (or the fit's start).

        Args:
            now: `time.monotonic()` as the caller reads it (the engine's clock, which tests move).
        """
        minutes = self._host.policy.every_n_minutes
        return minutes is not None and now - self.last_save_time >= minutes * 60

    def saved(self, step: int, now: float) -> None:
        """A save was committed: the step and time triggers count from it."""
        self.last_save_time = now
        self.last_saved_step = step

    def _namer(
        self, epoch: int, step: int, values: Mapping[str, float]
    ) -> Callable[[str, str, frozenset[str]], SaveItem]:
        """Makes unique SaveItems for this save from name templates."""
        host = self._host
        # A metric logged on other epochs (or the monitor) but not this one shows as nan in the name;
        # a placeholder never logged at all stays an error (most likely a typo).
        fields: dict[str, Any] = {name: math.nan for name in self.seen_metrics}
        if host.policy.monitor is not None:
            fields[host.policy.monitor] = math.nan
        fields.update(values)
        fields.update(epoch=epoch + host.epoch_base, step=step)
        given: set[str] = set()
        manifest = host.manifest

        class Taken:  # the manifest's names and this save's, without copying a long run's names
            def __contains__(self, name: object) -> bool:
                return name in given or name in manifest

        def make(template: str, fmt: str, roles: frozenset[str]) -> SaveItem:
            name = unique_name(format_name(template, fields), Taken())
            given.add(name)
            return SaveItem(name, fmt, roles, name + host.extensions[fmt])

        return make
