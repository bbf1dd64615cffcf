"""A live engine decides each save from a handful of records; it must keep exactly what the rules keep over all of them."""

from __future__ import annotations

import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine
from tests.core.test_retention import simulate

EXT = {"training_state": ".ckpt"}
values_strategy = st.lists(
    st.one_of(st.none(), st.sampled_from([0.1, 0.2, 0.3, 0.5, 1.0, float("nan")]), st.floats(0, 2)),
    min_size=1,
    max_size=25,
)


def write(item, path):
    with open(path, "wb") as f:
        f.write(item.name.encode())


def kept_by_epoch(records) -> dict[int, frozenset[str]]:
    return {r.epoch: r.tags for r in records}


def run(dirpath: str, policy: CheckpointPolicy, values, first_epoch: int = 0) -> Engine:
    engine = Engine(policy.model_copy(update={"dirpath": dirpath}), extensions=EXT)
    engine.start()
    for epoch, value in enumerate(values, start=first_epoch):
        metrics = {} if value is None else {"val_loss": value}
        engine.save(epoch, epoch, metrics, write)
    return engine


@settings(max_examples=60, deadline=None)
@given(
    values=values_strategy,
    top_k=st.sampled_from([-1, 0, 1, 2, 3]),
    every=st.sampled_from([None, 1, 2, 3]),
    keep=st.sampled_from([None, 1, 2]),
    save_best_only=st.booleans(),
    last=st.booleans(),
    split=st.integers(0, 25),
)
def test_engine_keeps_what_the_rules_keep_over_the_whole_run(values, top_k, every, keep, save_best_only, last, split):
    if save_best_only and top_k in (-1, 0):
        top_k = 1
    policy = CheckpointPolicy(
        monitor="val_loss", mode="min", top_k=top_k, save_best_only=save_best_only, last=last,
        snapshots={"every_n_epochs": every, "keep": keep} if every else {},
    )
    expected = kept_by_epoch(simulate(policy, values))
    with tempfile.TemporaryDirectory() as folder:
        # the run stops once and resumes (from its last, or starts over in the same run's place)
        first = run(folder, policy, values[:split])
        first.close()
        second = run(folder, policy, values[split:], first_epoch=min(split, len(values)))
        records = second.run_records()
        second.close()
        if second.resumed_from is not None or split == 0:
            assert kept_by_epoch(records) == expected
        reopened = Engine(policy.model_copy(update={"dirpath": folder}), extensions=EXT)
        assert {r.name: r.tags for r in reopened.directory.load().records if r.run == second.run} == {
            r.name: r.tags for r in records
        }  # what is on disk is what the engine held


def test_a_policy_changed_on_resume_is_applied_to_every_record_at_the_first_save(tmp_path):
    wide = CheckpointPolicy(monitor="val_loss", top_k=4, snapshots={"every_n_epochs": 1}, last=True)
    run(str(tmp_path), wide, [0.9, 0.8, 0.7, 0.6, 0.5]).close()
    narrow = CheckpointPolicy(monitor="val_loss", top_k=1, snapshots={"every_n_epochs": 1, "keep": 2}, last=True)
    engine = run(str(tmp_path), narrow, [0.4], first_epoch=5)
    assert kept_by_epoch(engine.run_records()) == kept_by_epoch(simulate(narrow, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]))
    engine.close()
