"""FitSession's rules, framework-free: a tiny Framework that saves its "model" (a dict) as JSON files.

The scenarios every real adapter must also pass are in tests/conformance/; these pin the
session's own decisions with exact assertions.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from checkpoint_hooks import CheckpointPolicy, PolicyError
from checkpoint_hooks.core import CheckpointDirectory, CorruptCheckpointError, SaveError, SaveItem
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.framework import Framework, ResumePoint
from checkpoint_hooks.core.resume_state import ResumeState, read
from checkpoint_hooks.core.session import FitSession


class JsonFramework:
    """A model of one number per key, saved as JSON with the resume payload inside."""

    name = "Toy"
    extensions = {"training_state": ".json", "weights": ".w.json", "model": ".m.json"}
    default_format = "training_state"
    resumable_formats = frozenset({"training_state"})
    epoch_base = 0
    index_beside = False
    resumes_mid_epoch = False
    handles_sigterm = False
    broadcasts = True
    buffers = None

    def __init__(self) -> None:
        self.session: FitSession | None = None
        self.model: dict[str, float] = {"w": 0.0}
        self.loaded: list[str] = []
        self.start: ResumePoint | None = None
        self.stopped = False
        self.fail_load: set[str] = set()
        self.fail_write: Exception | None = None

    def is_writer(self) -> bool:
        return True

    def world_size(self) -> int:
        return 1

    def broadcast(self, value: Any) -> Any:
        return value

    def any_rank(self, flag: bool) -> bool:
        return flag

    def write(self, item: SaveItem, path: str) -> None:
        if self.fail_write is not None:
            raise self.fail_write
        assert self.session is not None
        with open(path, "w") as f:
            json.dump({"model": self.model, "resume": self.session.payload(item).to_dict()}, f)

    def can_snapshot(self, item: SaveItem) -> bool:
        return True

    def snapshot(self, item: SaveItem) -> Any:
        assert self.session is not None
        return {"model": dict(self.model), "resume": self.session.payload(item).to_dict()}

    def write_snapshot(self, item: SaveItem, snapshot: Any, path: str) -> None:
        if self.fail_write is not None:
            raise self.fail_write
        with open(path, "w") as f:
            json.dump(snapshot, f)

    def load(self, path: str) -> ResumeState | None:
        self.loaded.append(os.path.basename(path))
        if os.path.basename(path) in self.fail_load:
            raise ValueError("cannot read it")
        with open(path) as f:
            data = json.load(f)
        self.model = data["model"]
        return read(data["resume"])

    def set_start(self, point: ResumePoint) -> None:
        self.start = point

    def request_stop(self) -> None:
        self.stopped = True

    def rng_state(self) -> dict[str, Any]:
        return {"toy": 7}

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        self.model["rng"] = float(state["toy"])


def session(tmp_path: Any, **fields: Any) -> tuple[FitSession, JsonFramework]:
    fields.setdefault("monitor", "val_loss")
    fw = JsonFramework()
    s = FitSession(CheckpointPolicy(dirpath=str(tmp_path), **fields), fw)
    fw.session = s
    return s, fw


def fit(s: FitSession, fw: JsonFramework, losses: list[float], steps: int = 2) -> None:
    """Epochs with `steps` batches each; the model's weight is the global step."""
    s.begin()
    start = fw.start.start_epoch if fw.start is not None else 0
    step = s.resumed.step if s.resumed is not None else 0
    for epoch in range(start, len(losses)):
        s.epoch_begin(epoch)
        for _ in range(steps):
            step += 1
            fw.model["w"] = float(step)
            s.batch_end(step)
        s.epoch_end(epoch, step, {"val_loss": losses[epoch]})
    s.end()


def records(tmp_path: Any) -> list[Any]:
    manifest = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert manifest is not None
    return sorted(manifest.records, key=lambda r: r.seq)


def test_framework_protocol_is_satisfied_by_the_toy() -> None:
    assert isinstance(JsonFramework(), Framework)


def test_resume_loads_the_newest_and_starts_at_the_next_epoch(tmp_path: Any) -> None:
    s, fw = session(tmp_path, top_k=1)
    fit(s, fw, [0.5, 0.4])
    s2, fw2 = session(tmp_path, top_k=1)
    point = s2.begin()
    assert point is not None and (point.epoch, point.step, point.start_epoch) == (1, 4, 2)
    assert fw2.model["w"] == 4.0 and point.state is not None and point.state.rng == [s2.rng_state()]
    s2.restore_rng(point.state)
    assert fw2.model["rng"] == 7.0
    s2.end()


def test_a_newest_checkpoint_that_fails_verification_falls_back_to_the_one_before(tmp_path: Any, caplog: Any) -> None:
    s, fw = session(tmp_path, top_k=2)
    fit(s, fw, [0.5, 0.4])
    newest = records(tmp_path)[-1]
    with open(tmp_path / newest.primary_path, "r+") as f:
        f.write("X")  # same size, other bytes: the checksum fails (and the load too)
    s2, fw2 = session(tmp_path, top_k=2)
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        point = s2.begin()
    assert point is not None and point.epoch == 0 and fw2.model["w"] == 2.0
    assert fw2.loaded == [newest.primary_path, records(tmp_path)[0].primary_path]
    assert f"skipping checkpoint {tmp_path / newest.primary_path} for resume" in caplog.text
    s2.end()


def test_a_load_error_of_a_checkpoint_that_verifies_is_raised_and_releases_the_directory(tmp_path: Any) -> None:
    s, fw = session(tmp_path)
    fit(s, fw, [0.5])
    s2, fw2 = session(tmp_path)
    fw2.fail_load = {records(tmp_path)[-1].primary_path}
    with pytest.raises(ValueError, match="cannot read it"):
        s2.begin()
    s3, _ = session(tmp_path, resume="never")
    assert s3.begin() is None  # the lock was released
    s3.end()


def test_explicit_path_resume_refuses_missing_corrupt_and_non_resumable_checkpoints(tmp_path: Any) -> None:
    s, fw = session(tmp_path, top_k=-1, format="weights")
    fit(s, fw, [0.5, 0.4])
    weights, last = [r for r in records(tmp_path) if r.format == "weights"][0], records(tmp_path)[-1]
    with pytest.raises(PolicyError, match="existing checkpoint; .nowhere. does not exist"):
        session(tmp_path, resume="nowhere")[0].begin()
    with pytest.raises(PolicyError, match=r"is a 'weights' checkpoint, which holds no optimizer state"):
        session(tmp_path, resume=str(tmp_path / weights.primary_path))[0].begin()
    with open(tmp_path / last.primary_path, "a") as f:
        f.write(" ")
    with pytest.raises(CorruptCheckpointError, match=r"does not verify"):
        session(tmp_path, resume=str(tmp_path / last.primary_path))[0].begin()


def test_step_trigger_counts_a_crossed_multiple_and_leaves_the_last_batch_to_the_epoch_end(tmp_path: Any) -> None:
    s, _ = session(tmp_path, every_n_steps=4, last=False, top_k=0)
    s.begin()
    s.epoch_begin(0)
    for step in (3, 6, 9):  # steps_per_execution=3: 4 and 8 are crossed, never hit
        s.batch_end(step, batches=3)
    s.batch_end(12, batches=3, last_batch=True)  # 12 is due, but the epoch end follows
    saved = s.epoch_end(0, 12, {"val_loss": 0.3})
    s.end()
    mid = [(r.step, r.mid_epoch) for r in records(tmp_path)]
    assert mid == [(12, False)]  # the step-6 and step-9 saves were rolled over by the newer last
    assert [i.format for i in saved.plan.items] == ["training_state"] and saved.records[0].mid_epoch is False


def test_exception_rules(tmp_path: Any) -> None:
    s, fw = session(tmp_path)
    s.begin()
    assert not s.should_save_on(RuntimeError("x"))  # nothing trained in this fit yet
    s.epoch_begin(0)
    s.batch_end(1)
    assert s.should_save_on(RuntimeError("x")) and s.should_save_on(KeyboardInterrupt())
    assert not s.should_save_on(SaveError("disk full")) and not s.should_save_on(PolicyError("bad"))
    fw.world_size = lambda: 2  # type: ignore[method-assign]
    assert not s.should_save_on(RuntimeError("x"))
    assert s.should_save_on(type("SIGTERMException", (Exception,), {})())
    fw.world_size = lambda: 1  # type: ignore[method-assign]
    s.on_exception(RuntimeError("x"))
    assert [(r.epoch, r.step, r.mid_epoch, sorted(r.tags)) for r in records(tmp_path)] == [(0, 1, True, ["last", "preempted"])]
    assert s.preempted and s.engine is not None


def test_a_background_save_error_is_raised_at_the_end_of_a_fit_and_only_logged_after_an_exception(
    tmp_path: Any, caplog: Any
) -> None:
    s, fw = session(tmp_path, async_save=True)
    s.begin()
    fw.fail_write = OSError(28, "No space left on device")
    s.epoch_begin(0)
    s.epoch_end(0, 1, {"val_loss": 0.5})
    with pytest.raises(SaveError, match="No space left on device"):
        s.end()
    s2, fw2 = session(tmp_path / "b", async_save=True)
    s2.begin()
    fw2.fail_write = OSError(28, "No space left on device")
    s2.epoch_end(0, 1, {"val_loss": 0.5})
    with caplog.at_level(logging.ERROR, logger="checkpoint_hooks"):
        s2.on_exception(RuntimeError("training broke"))
    assert "No space left on device" in caplog.text


def test_sigterm_saves_at_the_next_safe_point_and_is_raised_again_with_the_handler_before_the_fit(tmp_path: Any) -> None:
    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        s, fw = session(tmp_path)
        s.begin()
        s.epoch_begin(0)
        s.batch_end(1)
        os.kill(os.getpid(), signal.SIGTERM)  # our handler only marks it
        assert received == [] and not fw.stopped
        s.batch_end(2)  # the safe point: save, stop, end, then the signal again
        assert received == [signal.SIGTERM] and fw.stopped and s.preempted
        assert [(r.step, sorted(r.tags)) for r in records(tmp_path)] == [(2, ["last", "preempted"])]
        assert s.engine is not None and not s._in_fit
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_later_fit_of_the_same_session_continues_its_own_run_without_loading(tmp_path: Any) -> None:
    s, fw = session(tmp_path)
    fit(s, fw, [0.5])
    run = records(tmp_path)[0].run
    assert s.begin(restore="own_run") is None and fw.loaded == []
    s.epoch_begin(1)
    s.epoch_end(1, 4, {"val_loss": 0.4})
    s.end()
    assert {r.run for r in records(tmp_path)} == {run}


def test_payload_reads_what_earlier_releases_wrote() -> None:
    keras_v1 = {"format": "checkpoint_hooks.keras", "epoch": 2, "step": 30, "mid_epoch": True, "epoch_batches": 5,
                "seed_states": [[1, 2]], "torch_rng_state": [1, 2, 3]}
    state = read(keras_v1)
    assert state is not None and (state.epoch, state.step, state.mid_epoch, state.epoch_step) == (2, 30, True, 5)
    assert state.extra == {"seed_states": [[1, 2]]} and state.rng == [{"torch": [1, 2, 3]}]
    paddle_v2 = {"version": 2, "epoch": 1, "global_step": 8, "mid_epoch": False, "epoch_step": None,
                 "param_names": {"w": "linear_0.w_0"}, "learning_rate": 0.1, "world_size": 1, "rng": b"\x80"}
    state = read(paddle_v2)
    assert state is not None and (state.epoch, state.step) == (1, 8)
    assert state.extra["param_names"] == {"w": "linear_0.w_0"} and state.rng == [{"paddle_pickle": b"\x80"}]
    lightning_v1 = [{"torch": "t0", "python": [3, [1], None]}, {"torch": "t1"}]
    state = read(lightning_v1)
    assert state is not None and state.epoch is None and state.rng_of(1) == {"torch": "t1"} and state.rng_of(5) == state.rng[0]
    assert read({"something": "else"}) is None and read(None) is None
    current = ResumeState(epoch=3, step=9, mid_epoch=True, epoch_step=2, rng=[{"a": 1}], extra={"x": 1})
    assert read(json.loads(json.dumps(current.to_dict()))) == current


def test_session_calls_before_begin_name_the_fix(tmp_path: Any) -> None:
    s, _ = session(tmp_path)
    with pytest.raises(CheckpointError, match="must be passed to fit"):
        s.epoch_end(0, 1, {})


@pytest.fixture(autouse=True)
def _no_leftover_handlers() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) == before
