"""Temporary folders a killed process left behind are removed by the next one (core.scratch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from checkpoint_hooks.core import scratch


def ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_folders_of_ended_processes_on_this_host_are_removed_and_nothing_else(tmp_path: Path) -> None:
    host = scratch._HOST
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    dead, live = ended_pid(), os.getppid()
    names = {
        "ended": f"checkpoint_hooks-staging-{host}-{dead}-abc_12",
        "mine": f"checkpoint_hooks-staging-{host}-{os.getpid()}-abc_12",
        "live": f"checkpoint_hooks-rank-{host}-{live}-abc_12",
        "elsewhere": f"checkpoint_hooks-staging-{other_host}-{dead}-abc_12",
        "unrelated": f"someone-else-{host}-{dead}-abc",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__1_0.distcp").write_bytes(b"shard")
    (tmp_path / f"checkpoint_hooks-rank-{host}-{dead}-file").write_bytes(b"not a folder")
    assert scratch.sweep(str(tmp_path)) == [names["ended"]]
    left = set(os.listdir(tmp_path))
    assert names["ended"] not in left and {names[k] for k in ("mine", "live", "elsewhere", "unrelated")} <= left
    assert f"checkpoint_hooks-rank-{host}-{dead}-file" in left


def test_a_folder_is_named_for_its_use_this_host_and_this_process() -> None:
    with scratch.temporary("staging") as path:
        name = os.path.basename(path)
        assert name.startswith(f"checkpoint_hooks-staging-{scratch._HOST}-{os.getpid()}-") and os.path.isdir(path)
    assert not os.path.exists(path)
