"""What a user reads from the shared session: verbose output without a logging setup, and a directory
that another framework wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine
from checkpoint_hooks.core.errors import CheckpointError
from tests.core.test_session import fit, session

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_directory_written_by_another_framework_is_named_in_one_line(tmp_path: Path) -> None:
    engine = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss"), extensions={"training_state": ".ckpt"})
    engine.start()
    engine.save(0, 5, {"val_loss": 0.5}, lambda item, p: Path(p).write_bytes(b"lightning bytes"))
    engine.close()
    s, fw = session(tmp_path)
    with pytest.raises(CheckpointError, match="another framework wrote") as caught:
        fit(s, fw, [0.5, 0.4])
    message = str(caught.value)
    assert "\n" not in message and ".ckpt" in message and "Toy writes .json" in message
    assert "resume='never'" in message and fw.loaded == []
    s, fw = session(tmp_path, resume="never")
    fit(s, fw, [0.5, 0.4])  # the way out the message gives works
    assert fw.start is None


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.core.test_session import fit, session
s, fw = session({dirpath!r}, verbose={verbose})
fit(s, fw, [0.5, 0.4])
"""


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_prints_saves_without_a_logging_setup(tmp_path: Path, verbose: bool) -> None:
    script = SCRIPT.format(root=ROOT, dirpath=str(tmp_path / "run"), verbose=verbose)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = "saved" in proc.stderr
    assert printed == verbose, proc.stderr


def test_a_finished_run_started_again_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s, fw = session(tmp_path)
    fit(s, fw, [0.5, 0.4])
    s, fw = session(tmp_path)
    s.begin()
    with caplog.at_level("WARNING", logger="checkpoint_hooks"):
        assert s.note_complete(2) and not s.note_complete(3)
    s.end()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "already completed 2 epoch(s)" in said[0] and "epoch=001" in said[0]
