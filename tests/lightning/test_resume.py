"""Automatic resume as a user meets it: a training process killed with SIGKILL, the same command run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.index import read_index

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "tests.lightning.train_script", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def listing(path):
    return sorted((r["name"], tuple(r["tags"])) for r in read_index(path)["records"])


def assert_same_state(a_path, b_path):
    a, b = torch.load(a_path), torch.load(b_path)
    assert a["global_step"] == b["global_step"]
    assert a["lr"] == b["lr"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


@pytest.mark.parametrize(
    "namespace, extra",
    [("lightning.pytorch", []), ("pytorch_lightning", []), ("lightning.pytorch", ["--async-save"])],
    ids=["lightning", "pytorch_lightning", "async_save"],
)
def test_killed_and_rerun_equals_uninterrupted(tmp_path, namespace, extra):
    full = run_script("--dir", str(tmp_path / "full"), "--epochs", "4", "--out", str(tmp_path / "full.pt"), "--namespace", namespace)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_script("--dir", str(tmp_path / "split"), "--epochs", "4", "--out", str(tmp_path / "split.pt"),
                        "--namespace", namespace, "--kill-at-epoch", "2", *extra)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "split.pt").exists()
    resumed = run_script("--dir", str(tmp_path / "split"), "--epochs", "4", "--out", str(tmp_path / "split.pt"),
                         "--namespace", namespace, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(tmp_path / "full.pt", tmp_path / "split.pt")
    # retention went on as if uninterrupted: the same checkpoints, with the same tags
    assert listing(tmp_path / "full") == listing(tmp_path / "split")


def rewrite_resume_point(dirpath, change):
    """Apply `change` to the checkpoint dict a rerun resumes from, and record its new bytes in the index."""
    from dataclasses import replace

    from checkpoint_hooks.core.directory import CheckpointDirectory
    from checkpoint_hooks.core.hashing import checksum_file
    from checkpoint_hooks.core.records import FileEntry

    directory = CheckpointDirectory(str(dirpath))
    manifest = directory.read_manifest()
    last = next(r for r in manifest.records if "last" in r.tags)
    path = dirpath / last.primary_path
    ckpt = torch.load(path, weights_only=False)
    change(ckpt)
    torch.save(ckpt, path)
    checksum, size = checksum_file(str(path))
    entry = FileEntry(last.primary_path, size, checksum)
    manifest.records = [replace(r, files=(entry, *r.files[1:])) if r is last else r for r in manifest.records]
    directory.commit(manifest)


def test_without_rng_restore_the_runs_would_differ(tmp_path, monkeypatch):
    """The comparison above can fail: resuming without the RNG states gives different weights."""
    full = run_script("--dir", str(tmp_path / "full"), "--epochs", "3", "--out", str(tmp_path / "full.pt"))
    assert full.returncode == 0, full.stderr[-3000:]
    run_script("--dir", str(tmp_path / "split"), "--epochs", "3", "--out", str(tmp_path / "x.pt"), "--kill-at-epoch", "1")
    # drop the saved RNG states (the resume payload) from the checkpoint the rerun resumes from
    rewrite_resume_point(tmp_path / "split", lambda ckpt: ckpt.pop("checkpoint_hooks"))
    resumed = run_script("--dir", str(tmp_path / "split"), "--epochs", "3", "--out", str(tmp_path / "split.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "full.pt")["state_dict"], torch.load(tmp_path / "split.pt")["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def to_the_earlier_layout(ckpt):
    """What the release before the resume payload wrote: `checkpoint_hooks_rng`, a list of tensors and tuples per rank."""
    import numpy as np

    from checkpoint_hooks.core.resume_state import decode_bytes

    payload = ckpt.pop("checkpoint_hooks")
    states = []
    for rng in payload["rng"]:
        version, inner, gauss = rng["python"]
        name, keys, pos, has_gauss, cached = rng["numpy"]
        states.append({
            "torch": torch.frombuffer(bytearray(decode_bytes(rng["torch"])), dtype=torch.uint8),
            "python": (version, tuple(inner), gauss),
            "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        })
    ckpt["checkpoint_hooks_rng"] = states


def test_a_checkpoint_of_the_earlier_layout_resumes_with_its_rng(tmp_path):
    full = run_script("--dir", str(tmp_path / "full"), "--epochs", "3", "--out", str(tmp_path / "full.pt"))
    assert full.returncode == 0, full.stderr[-3000:]
    run_script("--dir", str(tmp_path / "split"), "--epochs", "3", "--out", str(tmp_path / "x.pt"), "--kill-at-epoch", "1")
    rewrite_resume_point(tmp_path / "split", to_the_earlier_layout)
    resumed = run_script("--dir", str(tmp_path / "split"), "--epochs", "3", "--out", str(tmp_path / "split.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(tmp_path / "full.pt", tmp_path / "split.pt")
    assert listing(tmp_path / "full") == listing(tmp_path / "split")
