"""Retention as pure functions: table-driven cases and properties over random metric sequences."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import retention
from checkpoint_hooks.core.records import BEST, LAST, SNAPSHOT, Record

NAN = float("nan")
INF = float("inf")


def simulate(policy: CheckpointPolicy, values: list[float | None]) -> list[Record]:
    """Run plan_save/retain over a sequence of epoch-end values, as the engine does; returns the kept records."""
    records: list[Record] = []
    for epoch, value in enumerate(values):
        roles = retention.plan_save(policy, records, epoch, value)
        if not roles:
            continue
        metrics = {} if value is None or policy.monitor is None else {policy.monitor: value}
        new = Record(name=f"e{epoch}", epoch=epoch, step=epoch, format="training_state", metrics=metrics,
                     roles=roles.names(), tags=roles.names(), seq=epoch + 1)
        tags = retention.retain(policy, [*records, new])
        records = [r.with_tags(tags[r.name]) for r in [*records, new] if r.name in tags]
    return records


def epochs_with(records: list[Record], tag: str) -> set[int]:
    return {r.epoch for r in records if tag in r.tags}


def policy(**kw) -> CheckpointPolicy:
    kw.setdefault("last", False)
    return CheckpointPolicy(**kw)


# (top_k, mode, values, epochs kept by the top-k rule). Expected sets follow Lightning's
# ModelCheckpoint: strict improvement over the k-th, the earliest of equally bad ones evicted first.
TOP_K_CASES = [
    (1, "min", [3, 2, 1], {2}),
    (1, "min", [1, 2, 3], {0}),
    (2, "min", [5, 4, 3, 6, 1], {2, 4}),
    (2, "max", [5, 4, 3, 6, 1], {0, 3}),
    (3, "min", [1, 1, 1, 1], {0, 1, 2}),            # a tie with the k-th does not enter
    (2, "min", [1, 1, 0.5], {1, 2}),                # the earlier of two tied worst is evicted
    (1, "min", [NAN, 2.0], {1}),                     # NaN ranks below every number
    (1, "min", [2.0, NAN], {0}),                     # NaN never improves
    (2, "min", [NAN, NAN, 1.0], {1, 2}),
    (1, "max", [-INF, 0.0], {1}),
    (1, "min", [INF, 5.0], {1}),
    (-1, "min", [3, 1, 2], {0, 1, 2}),
    (0, "min", [3, 1, 2], set()),
    (2, "min", [None, 1.0, None, 0.5, 0.7], {3, 4}),  # epochs without a value are not ranked
]


@pytest.mark.parametrize("top_k, mode, values, expected", TOP_K_CASES)
def test_top_k_keeps(top_k, mode, values, expected):
    p = policy(monitor="metric", mode=mode, top_k=top_k)
    assert epochs_with(simulate(p, values), BEST) == expected


@pytest.mark.parametrize(
    "values, min_delta, expected",
    [
        ([1.0, 0.95, 0.5], 0.1, {2}),    # 0.95 improves by less than min_delta
        ([1.0, 0.85, 0.5], 0.1, {2}),
        ([1.0, 0.85], 0.1, {1}),
    ],
)
def test_min_delta(values, min_delta, expected):
    p = policy(monitor="loss", top_k=1, min_delta=min_delta)
    assert epochs_with(simulate(p, values), BEST) == expected


def test_save_best_only_saves_only_improvements():
    p = policy(monitor="loss", top_k=3, save_best_only=True)
    kept = simulate(p, [0.5, 0.4, 0.45, 0.3])
    # 0.45 is not a new best, so it is never saved even though a top-3 slot is free.
    assert epochs_with(kept, BEST) == {0, 1, 3}


def test_top_k_without_monitor_keeps_newest():
    assert epochs_with(simulate(policy(top_k=1), [None] * 4), BEST) == {3}
    assert epochs_with(simulate(policy(top_k=-1), [None] * 3), BEST) == {0, 1, 2}


@pytest.mark.parametrize(
    "every, keep, epochs, expected",
    [
        (2, None, 6, {1, 3, 5}),
        (2, 1, 6, {5}),
        (3, 2, 10, {5, 8}),
        (None, None, 4, set()),
    ],
)
def test_snapshots(every, keep, epochs, expected):
    p = policy(monitor="loss", top_k=0, snapshots={"every_n_epochs": every, "keep": keep})
    assert epochs_with(simulate(p, [1.0] * epochs), SNAPSHOT) == expected


def test_last_is_the_newest_and_survives_top_k():
    p = policy(monitor="loss", top_k=1, last=True)
    kept = simulate(p, [0.1, 0.5, 0.9])
    assert epochs_with(kept, LAST) == {2}
    assert epochs_with(kept, BEST) == {0}
    assert {r.epoch for r in kept} == {0, 2}


def test_is_better_and_rank_value():
    assert retention.is_better(1.0, 2.0, "min")
    assert not retention.is_better(2.0, 2.0, "min")
    assert retention.is_better(3.0, 2.0, "max")
    assert not retention.is_better(NAN, 2.0, "min")
    assert retention.is_better(2.0, NAN, "min")
    assert retention.is_better(2.0, None, "max")
    assert retention.rank_value(NAN, "max") == math.inf
    assert retention.rank_value(None, "min") == math.inf


# -- properties -----------------------------------------------------------------------

values_strategy = st.lists(
    st.one_of(
        st.sampled_from([0.0, 1.0, 2.0, NAN, INF, -INF]),
        st.floats(min_value=-5, max_value=5, allow_nan=False),
        st.none(),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    values=values_strategy,
    k=st.integers(min_value=-1, max_value=4),
    mode=st.sampled_from(["min", "max"]),
    every=st.one_of(st.none(), st.integers(min_value=1, max_value=5)),
    keep=st.one_of(st.none(), st.integers(min_value=1, max_value=3)),
    save_best_only=st.booleans(),
)
def test_invariants(values, k, mode, every, keep, save_best_only):
    if save_best_only and k == 0:
        k = 1
    p = CheckpointPolicy(monitor="m", mode=mode, top_k=k, save_best_only=save_best_only, last=True,
                         snapshots={"every_n_epochs": every, "keep": keep})
    kept = simulate(p, values)
    best = [r for r in kept if BEST in r.tags]
    # kept best <= k
    if k >= 0:
        assert len(best) <= k
    # last always kept: the newest epoch
    assert epochs_with(kept, LAST) == {len(values) - 1}
    # the best-so-far (a number, earliest among ties) is always kept while k != 0
    numbers = [(retention.rank_value(v, mode), i) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if numbers and k != 0:
        best_epoch = min(numbers)[1]
        assert best_epoch in epochs_with(kept, BEST)
    # snapshots per rule
    due = [e for e in range(len(values)) if every and (e + 1) % every == 0]
    if keep is not None:
        due = due[-keep:]
    assert epochs_with(kept, SNAPSHOT) == set(due)
    # nothing kept that no rule wants
    assert all(r.tags for r in kept)
    # without save_best_only the kept scores are exactly the k best scores seen (ties aside, which epoch)
    if k > 0 and not save_best_only:
        kept_ranks = sorted(retention.rank_value(r.metrics["m"], mode) for r in best)
        all_ranks = sorted(retention.rank_value(v, mode) for v in values if v is not None)
        assert kept_ranks == all_ranks[:k]


# -- keep_every_n_hours: milestones ------------------------------------------------------

def timed(epochs_and_hours, **policy_kwargs):
    """Records saved at the given hours, run through the rules one save at a time."""
    p = CheckpointPolicy(**{"last": True, **policy_kwargs})
    records: list[Record] = []
    for seq, (epoch, hours) in enumerate(epochs_and_hours, start=1):
        roles = retention.plan_save(p, records, epoch, None)
        new = Record(name=f"e{epoch}", epoch=epoch, step=epoch, format="training_state", roles=roles.names(),
                     tags=roles.names(), created=1_000_000 + hours * 3600, seq=seq)
        tags = retention.retain(p, [*records, new])
        records = [r.with_tags(tags[r.name]) for r in [*records, new] if r.name in tags]
    return records


@pytest.mark.parametrize(
    "hours, every, expected",
    [
        ([0, 0.5, 1.0, 1.5, 2.2, 2.9, 3.1], 1, {0, 2, 4, 6}),   # first checkpoint of each 1-hour window
        ([0, 0.5, 1.0, 1.5, 2.2, 2.9, 3.1], 2, {0, 4}),
        ([0, 3.5, 3.6], 1, {0, 1}),                             # empty windows keep nothing
        ([0, 0.1, 0.2], 10, {0}),
    ],
)
def test_keep_every_n_hours(hours, every, expected):
    kept = timed(list(enumerate(hours)), top_k=1, snapshots={"keep_every_n_hours": every})
    assert epochs_with(kept, "milestone") == expected
    # the other rules go on as usual beside it: top_k=1 without a monitor keeps the newest, last is the newest
    assert epochs_with(kept, LAST) == {len(hours) - 1} and epochs_with(kept, BEST) == {len(hours) - 1}
    assert {r.epoch for r in kept} == expected | {len(hours) - 1}


def test_without_keep_every_n_hours_there_are_no_milestones():
    kept = timed([(0, 0), (1, 5), (2, 10)], top_k=1)
    assert epochs_with(kept, "milestone") == set() and {r.epoch for r in kept} == {2}


def test_preempted_tag_follows_the_resume_point():
    p = CheckpointPolicy(top_k=0)
    first = Record(name="p", epoch=1, step=5, format="training_state", roles=frozenset({LAST, "preempted"}), seq=1)
    assert retention.retain(p, [first]) == {"p": frozenset({LAST, "preempted"})}
    later = Record(name="l", epoch=2, step=9, format="training_state", roles=frozenset({LAST}), seq=2)
    assert retention.retain(p, [first.with_tags(frozenset({LAST, "preempted"})), later]) == {"l": frozenset({LAST})}
