"""Pure retention decisions over plain records; no filesystem, no framework.

Two questions, answered the same way for every framework:

* `plan_save`: which roles (best, snapshot, last) does this epoch end save for?
* `retain`: given the committed records, which are kept and with which tags?

The top-k rule reproduces Lightning's `ModelCheckpoint(save_top_k=k)`: a new
value enters while fewer than k are kept, otherwise only when strictly better
than the worst kept one (by more than `min_delta`); the worst is evicted, the
earliest saved among equally bad ones first. NaN ranks below every number and
never counts as an improvement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from checkpoint_hooks.core.records import BEST, LAST, MILESTONE, PREEMPTED, SNAPSHOT, Record
from checkpoint_hooks.policy import CheckpointPolicy, Mode


@dataclass(frozen=True)
class SaveRoles:
    """What one epoch end saves for; empty means nothing is written."""

    best: bool = False
    snapshot: bool = False
    last: bool = False

    def __bool__(self) -> bool:
        return self.best or self.snapshot or self.last

    def names(self) -> frozenset[str]:
        return frozenset(n for n, on in ((BEST, self.best), (SNAPSHOT, self.snapshot), (LAST, self.last)) if on)


def rank_value(score: float | None, mode: Mode) -> float:
    """A score as a number where lower is better; NaN and a missing score rank last."""
    if score is None or math.isnan(score):
        return math.inf
    return score if mode == "min" else -score


def is_better(score: float | None, reference: float | None, mode: Mode, min_delta: float = 0.0) -> bool:
    """True when `score` beats `reference` by more than `min_delta`; NaN never beats anything."""
    if score is None or math.isnan(score):
        return False
    if reference is None or math.isnan(reference):
        return True
    if mode == "min":
        return score < reference - min_delta
    return score > reference + min_delta


def best_score(records: Iterable[Record], monitor: str, mode: Mode) -> float | None:
    """The best monitored value among `records` (None when none has a number)."""
    best: float | None = None
    for record in records:
        score = record.score(monitor)
        if score is not None and not math.isnan(score) and (best is None or is_better(score, best, mode)):
            best = score
    return best


def _worst(members: Sequence[Record], monitor: str | None, mode: Mode) -> Record:
    """The member the top-k rule evicts first: the worst score, the earliest saved among ties."""
    if monitor is None:
        return min(members, key=lambda r: (r.step, r.epoch, r.seq))
    worst = members[0]
    for record in members[1:]:
        if rank_value(record.score(monitor), mode) > rank_value(worst.score(monitor), mode):
            worst = record
    return worst


def top_k_members(records: Sequence[Record]) -> list[Record]:
    """Records currently held by the top-k rule, in save order."""
    return sorted((r for r in records if BEST in r.tags), key=lambda r: r.seq)


def enters_top_k(policy: CheckpointPolicy, members: Sequence[Record], score: float | None) -> bool:
    """Would a checkpoint with this score be kept by the top-k rule, given the current members?"""
    k = policy.top_k
    if k == 0:
        return False
    if policy.monitor is None or k == -1 or len(members) < k:
        return True
    worst = _worst(members, policy.monitor, policy.resolved_mode)
    return is_better(score, worst.score(policy.monitor), policy.resolved_mode, policy.min_delta)


def snapshot_due(policy: CheckpointPolicy, epoch: int) -> bool:
    """Snapshots fall after epochs N, 2N, ... counted from 1 (epoch is the 0-based index)."""
    every = policy.snapshots.every_n_epochs
    return every is not None and (epoch + 1) % every == 0


def plan_save(
    policy: CheckpointPolicy, records: Sequence[Record], epoch: int, score: float | None, *, mid_epoch: bool = False
) -> SaveRoles:
    """Roles this epoch end saves for, given the committed records of the current run.

    `score` is the monitored value this epoch (None when it was not logged: then
    the top-k rule does not consider this epoch, snapshots and last still do).
    `mid_epoch`: a save point inside the epoch (a validation there): no snapshot, which belongs to epoch ends.
    """
    best = False
    if policy.top_k != 0 and (policy.monitor is None or score is not None):
        members = top_k_members(records)
        best = enters_top_k(policy, members, score)
        if best and policy.save_best_only:
            previous = best_score(members, policy.monitor or "", policy.resolved_mode) if policy.monitor else None
            best = is_better(score, previous, policy.resolved_mode, policy.min_delta)
    return SaveRoles(best=best, snapshot=not mid_epoch and snapshot_due(policy, epoch), last=policy.last)


def milestones(policy: CheckpointPolicy, records: Sequence[Record]) -> list[Record]:
    """The first checkpoint of every `keep_every_n_hours` window of the run, counted from its first checkpoint.

    Stable as the run goes on: the first record of a window was the newest when it was saved, and
    from then on it is kept, so it stays the first of its window.
    """
    hours = policy.snapshots.keep_every_n_hours
    if hours is None or not records:
        return []
    ordered = sorted(records, key=lambda r: r.seq)
    start = min(r.created for r in ordered)
    chosen: dict[int, Record] = {}
    for record in ordered:
        chosen.setdefault(int((record.created - start) // (hours * 3600)), record)
    return list(chosen.values())


def retain(policy: CheckpointPolicy, records: Sequence[Record]) -> dict[str, frozenset[str]]:
    """The tags each kept record holds after the newest save; records absent from the result are pruned.

    `records` are the current run's records in save order, the newest last, with
    the tags retention gave them before the newest arrived (the newest carries
    its roles as tags).
    """
    kept: dict[str, set[str]] = {}

    members = top_k_members(records)
    k = policy.top_k
    if k >= 0:
        while len(members) > k:
            members.remove(_worst(members, policy.monitor, policy.resolved_mode))
    for record in members:
        kept.setdefault(record.name, set()).add(BEST)

    snapshots = [r for r in records if SNAPSHOT in r.roles]
    keep = policy.snapshots.keep
    if keep is not None:
        snapshots = snapshots[-keep:] if keep > 0 else []
    for record in snapshots:
        kept.setdefault(record.name, set()).add(SNAPSHOT)

    lasts = [r for r in records if LAST in r.roles]
    if lasts:
        newest = max(lasts, key=lambda r: r.seq)
        # a save on preemption stays marked as such while it is the resume point
        kept.setdefault(newest.name, set()).update({LAST} | ({PREEMPTED} & newest.roles))

    for record in milestones(policy, records):
        kept.setdefault(record.name, set()).add(MILESTONE)

    return {name: frozenset(tags) for name, tags in kept.items()}


def replay(policy: CheckpointPolicy, records: Sequence[Record], resumable: frozenset[str] = frozenset({"training_state"})) -> dict[str, frozenset[str]]:
    """Apply `policy` afresh to one run's existing records, in save order, as if it had decided every save.

    A record takes the roles the policy would have given it at its epoch and that
    its format can serve (only a resumable format can be `last`). Returns the tags
    of the records kept; the others would be pruned.
    """
    kept: list[Record] = []
    for record in sorted(records, key=lambda r: r.seq):
        roles = plan_save(policy, kept, record.epoch, record.score(policy.monitor))
        names = set(roles.names())
        if record.format not in resumable and LAST not in record.roles:
            names.discard(LAST)
        if not names:
            continue
        candidate = record.with_tags(frozenset(names))
        tags = retain(policy, [*kept, candidate])
        kept = [r.with_tags(tags[r.name]) for r in [*kept, candidate] if r.name in tags]
    return {r.name: r.tags for r in kept}
