"""Crash consistency in `make test`: SIGKILL at random moments and at every save phase, then restart.

The long mode is `python -m tests.reliability.crash --kills 200` (see that module)."""

from __future__ import annotations

from tests.reliability.crash import PHASES, campaign


def assert_ok(summary):
    assert summary.problems == []
    assert summary.resumes_ok == summary.kills
    assert (summary.partial_accepted, summary.best_lost, summary.manifest_corrupt) == (0, 0, 0)
    assert (summary.leftovers_after_restart, summary.final_mismatch) == (0, 0)


def test_toy_training_survives_24_kills(tmp_path):
    summary = campaign("toy", kills=24, seed=1, workdir=str(tmp_path))
    assert_ok(summary)
    assert set(PHASES) <= set(summary.kills_by_phase)  # every phase was hit at least once
    assert summary.kills_by_phase.get("random", 0) >= 1
    assert summary.runs_completed >= 1


def test_background_saves_survive_kills_in_every_phase(tmp_path):
    summary = campaign("toy-async", kills=15, seed=4, workdir=str(tmp_path), random_share=0.2)
    assert_ok(summary)
    assert set(PHASES) <= set(summary.kills_by_phase)


def test_lightning_training_survives_a_kill_in_every_phase(tmp_path):
    summary = campaign("lightning", kills=len(PHASES), seed=2, workdir=str(tmp_path), random_share=0.0)
    assert_ok(summary)
    assert sorted(summary.kills_by_phase) == sorted(PHASES)
    assert summary.runs_completed >= 1


def test_the_checks_can_fail(tmp_path):
    """A directory where a committed file is damaged after the fact is reported, not accepted."""
    from checkpoint_hooks import CheckpointPolicy
    from checkpoint_hooks.core import Engine
    from tests.reliability.crash import Summary, ToyTarget, check_directory

    engine = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", top_k=2),
                    extensions={"training_state": ".json"})
    engine.start()
    engine.save(0, 1, {"val_loss": 0.5}, lambda item, path: open(path, "w").write("{}"))
    engine.close()
    (tmp_path / engine.manifest.records[0].primary_path).write_text("{ }")
    summary = Summary(target="toy")
    check_directory(ToyTarget(), str(tmp_path), {}, summary)
    assert summary.partial_accepted == 1
    history = {7: 0.01}  # a better value was committed once and is gone now
    check_directory(ToyTarget(), str(tmp_path), history, summary)
    assert summary.best_lost == 1
