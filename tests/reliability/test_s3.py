"""Remote directories for real: s3fs against moto's S3 server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine
from checkpoint_hooks.core.directory import CheckpointDirectory
from tests.reliability.crash import ROOT, campaign

EXT = {"training_state": ".bin"}


def test_save_prune_resume_verify_on_s3(bucket):
    policy = CheckpointPolicy(dirpath=f"{bucket}/run", monitor="loss", top_k=2, snapshots={"every_n_epochs": 2})
    e = Engine(policy, extensions=EXT)
    e.start()
    for epoch, loss in enumerate([0.5, 0.4, 0.6, 0.3, 0.7]):
        e.save(epoch, epoch, {"loss": loss}, lambda item, path: open(path, "wb").write(os.urandom(2048)))
    e.close()
    files = CheckpointDirectory(f"{bucket}/run").store.list_files()
    assert sorted(f for f in files if f.endswith(".bin")) == [
        "epoch=001-loss=0.4000.bin", "epoch=003-loss=0.3000.bin", "epoch=004-loss=0.7000.bin",
    ]
    again = Engine(policy, extensions=EXT)
    assert again.start().epoch == 4
    assert os.path.getsize(again.local_path(again.resumed_from)) == 2048
    again.close()
    cli = subprocess.run([sys.executable, "-m", "checkpoint_hooks.cli", "verify", f"{bucket}/run"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert cli.returncode == 0 and "ok: 3 file(s) of 3 checkpoint(s) verify" in cli.stdout, cli.stderr


def test_kills_during_upload_leave_nothing_visible_uncommitted(bucket, tmp_path):
    summary = campaign("toy", kills=6, seed=3, workdir=str(tmp_path), base=f"{bucket}/crash",
                       phases=["publish", "commit", "prune"], random_share=0.0)
    assert summary.problems == []
    assert summary.resumes_ok == summary.kills == 6
    assert (summary.partial_accepted, summary.best_lost, summary.leftovers_after_restart) == (0, 0, 0)
    assert summary.final_mismatch == 0


def test_the_checkpoint_a_run_resumed_from_survives_until_superseded(bucket, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = [sys.executable, "-m", "tests.reliability.toy_child", "--dir", f"{bucket}/r", "--epochs", "6"]
    subprocess.run([*script[:-1], "3"], env=env, check=True, capture_output=True, cwd=ROOT)
    resumed_from = max(CheckpointDirectory(f"{bucket}/r").read_manifest().records, key=lambda r: r.seq)
    # the rerun dies right before its first commit: what it resumed from must still be there, intact
    died = subprocess.run(script, env=dict(env, CH_FAULT="commit:1"), capture_output=True, cwd=ROOT)
    assert died.returncode == -9
    directory = CheckpointDirectory(f"{bucket}/r")
    assert directory.read_manifest().by_name(resumed_from.name) is not None
    assert directory.verify_record(resumed_from) == []
    finished = subprocess.run(script, env=env, capture_output=True, text=True, cwd=ROOT)
    assert finished.returncode == 0 and json.loads(finished.stdout.splitlines()[-1])["epoch"] == 5
