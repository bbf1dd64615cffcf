"""One checkpoint behaviour, every adapter: the same scenarios run against each framework's BestCheckpoint.

Each adapter is driven by `tests/conformance/drivers/<adapter>.py` in a child process (this
process imports no framework), all with one command line. Runs are shared between scenarios:
one uninterrupted reference run per adapter serves as the expected outcome of several.

To add an adapter, add its driver module and its name to ADAPTERS. List it in DIFFERENCES only
where its framework cannot do what the others do, and in KNOWN_BUGS where it falls short today.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from checkpoint_hooks import cli
from checkpoint_hooks.core.records import LAST, PREEMPTED
from tests.conformance.drivers import common
from tests.conformance.harness import Run, Runs, Spec, snapshot

ADAPTERS = ["lightning", "keras", "paddle", "torch"]


@dataclass(frozen=True)
class Traits:
    """Where a framework makes an adapter behave differently; the defaults are the common behaviour."""

    resumes_mid_epoch: bool = True  # a rerun from a mid-epoch save trains only the rest of that epoch
    shuffles: bool = True  # the driver shuffles the training data (and a resume restores its order)


# The one table of legitimate differences, and why.
DIFFERENCES: dict[str, Traits] = {
    # Keras's fit() cannot start an epoch at a given batch: a mid-epoch save's epoch starts over from
    # its first batch, whose optimizer steps count again. Keras also does not restore its shuffling
    # order on resume, so its driver does not shuffle (README, Keras "Resume").
    "keras": Traits(resumes_mid_epoch=False, shuffles=False),
    # hapi's fit() cannot skip batches either: the same restart of the epoch (README, Paddle).
    "paddle": Traits(resumes_mid_epoch=False),
    # a hand-written loop over batches cannot be entered half-way either: the epoch starts over
    "torch": Traits(resumes_mid_epoch=False),
}

# Scenario cases that fail today because of an adapter bug: (scenario, adapter) -> the bug.
KNOWN_BUGS: dict[tuple[str, str], str] = {
    ("sigterm_exit", "lightning"): (
        "a SIGTERM'd Lightning fit exits with status 0: Lightning raises SIGTERMException, a SystemExit "
        "without a code, and the adapter lets it end the process after its save, so a scheduler or "
        "`train && deploy` sees a preempted run as a success (Keras and Paddle re-raise SIGTERM)"
    ),
}

EPOCHS = 4
SPE = common.STEPS_PER_EPOCH
TOP_K = common.DEFAULT_POLICY["top_k"]
KILL_AFTER_EPOCH = 1
STEP_EVERY, KILL_AT_STEP = 5, 12
STEP_SAVED = KILL_AT_STEP // STEP_EVERY * STEP_EVERY  # the newest step save before the kill
SIGTERM_AT_STEP = 11
RAISE_AT_STEP = 13
# Mid-epoch steps, so that no epoch end's own save can stand in for the one a scenario expects.
assert all(step % SPE for step in (STEP_SAVED, SIGTERM_AT_STEP, RAISE_AT_STEP))


def traits(adapter: str) -> Traits:
    return DIFFERENCES.get(adapter, Traits())


def adapters(scenario: str) -> list[Any]:
    """ADAPTERS as parameters of one scenario, a known bug marked as a strict xfail."""
    return [
        pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(scenario, a)]))
        if (scenario, a) in KNOWN_BUGS
        else a
        for a in ADAPTERS
    ]


needs = pytest.mark.conformance_runs


# -- the runs ---------------------------------------------------------------------------


def corrupt_newest(dirpath: Path, before: Run | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Overwrite bytes in the middle of the newest resumable file (the rolling last); the size stays."""
    records, _ = snapshot(dirpath)
    newest = max((r for r in records if LAST in r.tags), key=lambda r: r.seq)
    # The reference keeps only the adapter's default format, from which every adapter resumes.
    previous = max((r for r in records if r.name != newest.name), key=lambda r: r.seq)
    path = dirpath / newest.primary_path
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    return {}, {"corrupted": newest.primary_path, "previous_epoch": previous.epoch}


def resume_from_earliest(dirpath: Path, before: Run | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """resume=<the oldest kept checkpoint>: not the newest, so auto resume would not pick it."""
    records, _ = snapshot(dirpath)
    earliest = min(records, key=lambda r: r.seq)
    path = dirpath / earliest.primary_path
    return {"resume": str(path)}, {"epoch": earliest.epoch, "newest_epoch": max(r.epoch for r in records)}


# In the order they are started: the runs others depend on first.
SPECS: dict[str, Spec] = {
    "reference": Spec(EPOCHS),
    "killed": Spec(EPOCHS, flags={"kill_after_epoch": KILL_AFTER_EPOCH}),
    "sigterm": Spec(EPOCHS, flags={"sigterm_at_step": SIGTERM_AT_STEP}),
    "steps": Spec(2, policy={"every_n_steps": STEP_EVERY}, flags={"kill_at_step": KILL_AT_STEP}),
    "raised": Spec(EPOCHS, flags={"raise_at_step": RAISE_AT_STEP}),
    "killed_rerun": Spec(EPOCHS, after="killed", directory="same"),
    "sigterm_rerun": Spec(EPOCHS, after="sigterm", directory="same"),
    "corrupt_rerun": Spec(EPOCHS, after="reference", directory="copy", prepare=corrupt_newest),
    "never": Spec(EPOCHS, policy={"resume": "never"}, after="reference", directory="copy"),
    "from_path": Spec(EPOCHS, after="reference", directory="copy", prepare=resume_from_earliest),
}


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """The driver runs of this module; those the selected tests read start at once, two at a time."""
    wanted: set[tuple[str, str]] = set()
    for item in request.session.items:
        marker = item.get_closest_marker("conformance_runs")
        callspec = getattr(item, "callspec", None)
        if marker is not None and callspec is not None and getattr(item, "module", None) is request.module:
            wanted.update((callspec.params["adapter"], name) for name in marker.args)
    order = list(SPECS)
    pool = Runs(tmp_path_factory.mktemp("conformance"), SPECS)
    pool.prefetch(sorted(wanted, key=lambda w: (order.index(w[1]), ADAPTERS.index(w[0]))))
    yield pool
    pool.close()


def finished(run: Run) -> dict[str, Any]:
    """The result of a run that had to complete."""
    assert run.returncode == 0, run.describe()
    assert run.result is not None, run.describe()
    return run.result


def batches(epochs: Mapping[int, int]) -> dict[str, int]:
    return {str(e): n for e, n in sorted(epochs.items())}


def top_k_oracle(values: Mapping[int, float], k: int) -> list[int]:
    """The epochs ModelCheckpoint(save_top_k=k, mode="min") keeps for these values, in epoch order.

    A value enters while fewer than k are kept, else only when strictly better than the worst
    kept; of equally bad ones the earliest leaves first.
    """
    kept: list[int] = []
    for epoch in sorted(values):
        if len(kept) < k:
            kept.append(epoch)
            continue
        worst = max(kept, key=lambda e: (values[e], -e))
        if values[epoch] < values[worst]:
            kept.remove(worst)
            kept.append(epoch)
    return sorted(kept)


# -- 1. SIGKILL after an epoch, then the same command again -------------------------------


@needs("reference", "killed", "killed_rerun")
@pytest.mark.parametrize("adapter", adapters("kill_and_rerun"))
def test_a_run_killed_after_an_epoch_and_rerun_ends_with_the_weights_of_an_uninterrupted_run(
    runs: Runs, adapter: str
) -> None:
    reference = finished(runs.get(adapter, "reference"))
    killed = runs.get(adapter, "killed")
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    assert killed.result is None
    assert max(r.epoch for r in killed.records) == KILL_AFTER_EPOCH  # epoch K was committed before the kill
    rerun = finished(runs.get(adapter, "killed_rerun"))
    assert rerun["trained_epochs"] == list(range(KILL_AFTER_EPOCH + 1, EPOCHS))
    assert rerun["batches"] == batches({e: SPE for e in range(KILL_AFTER_EPOCH + 1, EPOCHS)})
    assert rerun["global_step"] == reference["global_step"] == EPOCHS * SPE
    assert rerun["shuffled"] is reference["shuffled"] is traits(adapter).shuffles
    assert rerun["digest"] == reference["digest"]


@needs("reference", "killed_rerun")
@pytest.mark.parametrize("adapter", adapters("kill_and_rerun_retention"))
def test_a_run_killed_and_rerun_keeps_the_checkpoints_an_uninterrupted_run_keeps(runs: Runs, adapter: str) -> None:
    reference = runs.get(adapter, "reference")
    rerun = runs.get(adapter, "killed_rerun")
    finished(reference), finished(rerun)
    kept = sorted((r.name, r.epoch, sorted(r.tags)) for r in rerun.records)
    assert kept == sorted((r.name, r.epoch, sorted(r.tags)) for r in reference.records)
    assert rerun.problems == []


# -- 2. what is kept: top-k by the logged val_loss, and the best path ----------------------


@needs("reference")
@pytest.mark.parametrize("adapter", adapters("kept_set"))
def test_the_kept_checkpoints_and_best_model_path_match_a_top_k_oracle_of_the_logged_val_loss(
    runs: Runs, adapter: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs.get(adapter, "reference")
    result = finished(run)
    logged = {int(e): v for e, v in result["val_loss"].items()}
    assert sorted(logged) == list(range(EPOCHS))
    best_epochs = top_k_oracle(logged, TOP_K)
    last_epoch = EPOCHS - 1
    expected = sorted(
        (e, sorted(({"best"} if e in best_epochs else set()) | ({"last"} if e == last_epoch else set())))
        for e in {*best_epochs, last_epoch}
    )
    assert sorted((r.epoch, sorted(r.tags)) for r in run.records) == expected
    for record in run.records:
        assert record.metrics["val_loss"] == pytest.approx(logged[record.epoch], rel=1e-6)
    assert run.problems == []

    best_epoch = min(logged, key=lambda e: (logged[e], e))
    (best,) = [r for r in run.records if r.epoch == best_epoch]
    assert Path(result["best_model_path"]).resolve() == (run.dir / best.primary_path).resolve()
    assert cli.main(["best", str(run.dir)]) == 0
    assert Path(capsys.readouterr().out.strip()).resolve() == (run.dir / best.primary_path).resolve()


# -- 3. step trigger ------------------------------------------------------------------------


@needs("steps")
@pytest.mark.parametrize("adapter", adapters("every_n_steps"))
def test_every_n_steps_leaves_a_mid_epoch_rolling_last_at_the_expected_step(runs: Runs, adapter: str) -> None:
    run = runs.get(adapter, "steps")
    assert run.returncode == -signal.SIGKILL, run.describe()
    (last,) = run.records_tagged(LAST)
    assert (last.epoch, last.step, last.mid_epoch, last.format) == (STEP_SAVED // SPE, STEP_SAVED, True, "training_state")
    # The step saves before it rolled away; epoch 0's end stays as a best, no longer the last.
    assert sorted(r.step for r in run.records) == [SPE, STEP_SAVED]
    assert run.problems == []


# -- 4. SIGTERM -----------------------------------------------------------------------------


@needs("sigterm")
@pytest.mark.parametrize("adapter", adapters("sigterm_exit"))
def test_sigterm_during_training_ends_the_process_by_sigterm(runs: Runs, adapter: str) -> None:
    run = runs.get(adapter, "sigterm")
    assert run.result is None, "training should have stopped"
    assert run.returncode == -signal.SIGTERM, run.describe()


@needs("sigterm", "sigterm_rerun")
@pytest.mark.parametrize("adapter", adapters("sigterm_save_and_resume"))
def test_sigterm_commits_a_preempted_training_state_and_the_rerun_continues_from_it(runs: Runs, adapter: str) -> None:
    run = runs.get(adapter, "sigterm")
    assert run.result is None, "training should have stopped"
    (preempted,) = run.records_tagged(PREEMPTED)
    epoch, done = divmod(SIGTERM_AT_STEP, SPE)
    assert (preempted.epoch, preempted.step, preempted.mid_epoch) == (epoch, SIGTERM_AT_STEP, True)
    assert preempted.format == "training_state" and LAST in preempted.tags
    assert run.problems == []

    rerun = finished(runs.get(adapter, "sigterm_rerun"))
    trained = {e: SPE for e in range(epoch, EPOCHS)}
    if traits(adapter).resumes_mid_epoch:
        trained[epoch] = SPE - done
        final_step = EPOCHS * SPE
    else:
        final_step = EPOCHS * SPE + done  # the restarted epoch's first batches step again
    assert rerun["batches"] == batches(trained)
    assert rerun["global_step"] == final_step


# -- 5. an exception in a training step --------------------------------------------------------


@needs("raised")
@pytest.mark.parametrize("adapter", adapters("exception"))
def test_an_exception_in_a_training_step_propagates_after_a_preempted_state_is_committed(
    runs: Runs, adapter: str
) -> None:
    run = runs.get(adapter, "raised")
    assert run.returncode > 0, run.describe()  # an error exit, not a signal
    assert "RuntimeError" in run.stderr and "boom" in run.stderr
    assert run.result is None
    (preempted,) = run.records_tagged(PREEMPTED)
    assert (preempted.epoch, preempted.step, preempted.mid_epoch) == (RAISE_AT_STEP // SPE, RAISE_AT_STEP, True)
    assert preempted.format == "training_state"
    assert run.problems == []


# -- 6. a corrupt newest checkpoint --------------------------------------------------------


@needs("reference", "corrupt_rerun")
@pytest.mark.parametrize("adapter", adapters("corrupt_newest"))
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning_and_the_one_before_it_resumes(
    runs: Runs, adapter: str
) -> None:
    reference = finished(runs.get(adapter, "reference"))
    run = runs.get(adapter, "corrupt_rerun")
    result = finished(run)
    name = Path(run.notes["corrupted"]).name
    assert [line for line in run.stderr.splitlines() if "WARNING" in line and name in line], run.describe()
    assert result["trained_epochs"] == list(range(run.notes["previous_epoch"] + 1, EPOCHS))
    assert result["digest"] == reference["digest"]


# -- 7. resume="never" and resume=<path> -----------------------------------------------------


@needs("reference", "never")
@pytest.mark.parametrize("adapter", adapters("resume_never"))
def test_resume_never_trains_every_epoch_from_scratch_next_to_existing_checkpoints(runs: Runs, adapter: str) -> None:
    reference = runs.get(adapter, "reference")
    run = runs.get(adapter, "never")
    result = finished(run)
    assert result["trained_epochs"] == list(range(EPOCHS))
    assert result["batches"] == batches({e: SPE for e in range(EPOCHS)})
    assert result["digest"] == finished(reference)["digest"]
    # The checkpoints of the run it did not resume are left as they were, beside its own.
    after = {r.name: r for r in run.records}
    for record in reference.records:
        assert record.name in after and after[record.name].files == record.files
        assert after[record.name].tags == record.tags
    assert len(run.records) > len(reference.records) and run.problems == []


@needs("reference", "from_path")
@pytest.mark.parametrize("adapter", adapters("resume_path"))
def test_resume_from_a_path_continues_from_that_checkpoint(runs: Runs, adapter: str) -> None:
    reference = finished(runs.get(adapter, "reference"))
    run = runs.get(adapter, "from_path")
    result = finished(run)
    assert run.notes["epoch"] < run.notes["newest_epoch"]  # automatic resume would have picked another
    assert result["trained_epochs"] == list(range(run.notes["epoch"] + 1, EPOCHS))
    assert result["digest"] == reference["digest"]


def test_this_process_imported_no_training_framework() -> None:
    """Frameworks stay in the drivers' processes (TensorFlow and Paddle in one process crash)."""
    assert not {"torch", "lightning", "tensorflow", "keras", "paddle"} & set(sys.modules)
