"""Crash consistency: kill training processes with SIGKILL at random moments and at exact save phases,
restart them, and check after every kill that nothing uncommitted or partial is ever accepted.

    python -m tests.reliability.crash --kills 200            # the long mode; prints a JSON summary
    python -m tests.reliability.crash --kills 30 --target lightning

After every kill: the manifest parses; every committed checkpoint verifies (else "partial_accepted");
the best checkpoint by every metric ever committed is still listed and verifies (else "best_lost");
a restart resumes from the newest committed checkpoint, which verifies ("resumes_ok") and leaves no
uncommitted file behind. Every run that reaches its last epoch must end with exactly the state of an
uninterrupted run ("final_mismatch" otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine
from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.errors import ManifestError
from checkpoint_hooks.core.records import BEST

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASES = ["write", "publish", "commit", "manifest", "prune"]


@dataclass
class Summary:
    target: str
    kills: int = 0
    kills_by_phase: dict[str, int] = field(default_factory=dict)
    resumes_ok: int = 0
    partial_accepted: int = 0
    best_lost: int = 0
    manifest_corrupt: int = 0
    leftovers_after_restart: int = 0
    runs_completed: int = 0
    final_mismatch: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.partial_accepted or self.best_lost or self.manifest_corrupt
                    or self.leftovers_after_restart or self.final_mismatch) and self.resumes_ok == self.kills


class Target:
    """How to run one kind of training process and read its result."""

    name = ""
    epochs = 0
    extensions: dict[str, str] = {}
    policy_kwargs: dict = {}

    def command(self, dirpath: str, out: str) -> list[str]:
        raise NotImplementedError

    def result(self, proc: subprocess.CompletedProcess, out: str) -> object:
        raise NotImplementedError


class ToyTarget(Target):
    name = "toy"
    epochs = 12
    extensions = {"training_state": ".json"}
    policy_kwargs = {"monitor": "val_loss", "top_k": 2, "snapshots": {"every_n_epochs": 3}}

    def command(self, dirpath: str, out: str) -> list[str]:
        return [sys.executable, "-m", "tests.reliability.toy_child", "--dir", dirpath, "--epochs", str(self.epochs),
                "--payload-bytes", "200000"]

    def result(self, proc: subprocess.CompletedProcess, out: str) -> object:
        return json.loads(proc.stdout.strip().splitlines()[-1])


class ToyAsyncTarget(ToyTarget):
    """The toy training with async_save: every phase of a save runs on the background worker."""

    name = "toy-async"

    def command(self, dirpath: str, out: str) -> list[str]:
        return [*super().command(dirpath, out), "--async-save"]


class LightningTarget(Target):
    name = "lightning"
    epochs = 4
    extensions = {"training_state": ".ckpt"}
    policy_kwargs = {"monitor": "val_loss", "top_k": 2, "snapshots": {"every_n_epochs": 2}}

    def command(self, dirpath: str, out: str) -> list[str]:
        return [sys.executable, "-m", "tests.reliability.lightning_child", "--dir", dirpath, "--epochs",
                str(self.epochs), "--out", out]

    def result(self, proc: subprocess.CompletedProcess, out: str) -> object:
        import torch

        state = torch.load(out)
        return {k: v.tolist() for k, v in state["state_dict"].items()} | {"step": state["global_step"]}


TARGETS = {"toy": ToyTarget, "toy-async": ToyAsyncTarget, "lightning": LightningTarget}


def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    env.pop("CH_FAULT", None)
    if fault:
        env["CH_FAULT"] = fault
    return env


def check_directory(target: Target, dirpath: str, history: dict[int, float], summary: Summary) -> None:
    """Invariants that must hold at any moment after a kill."""
    directory = CheckpointDirectory(dirpath)
    try:
        manifest = directory.read_manifest()
    except ManifestError as exc:
        summary.manifest_corrupt += 1
        summary.problems.append(f"manifest: {exc}")
        return
    if manifest is None:
        return
    for record in manifest.records:
        problems = directory.verify_record(record)
        if problems:
            summary.partial_accepted += 1
            summary.problems.append(f"committed but does not verify: {record.name}: {problems[0]}")
        value = record.metrics.get("val_loss")
        if value is not None:
            history[record.epoch] = value
    finite = {e: v for e, v in history.items() if not math.isnan(v)}
    if finite:
        best_epoch = min(finite, key=lambda e: (finite[e], e))
        if not any(r.epoch == best_epoch and BEST in r.tags for r in manifest.records):
            summary.best_lost += 1
            summary.problems.append(f"best epoch {best_epoch} ({finite[best_epoch]}) is no longer kept")


def check_restart(target: Target, dirpath: str, summary: Summary) -> None:
    """What a restart finds: the newest committed checkpoint, verified, and no leftovers."""
    policy = CheckpointPolicy(dirpath=dirpath, **target.policy_kwargs)
    engine = Engine(policy, extensions=target.extensions)
    try:
        newest = max((r for r in engine.directory.load().records if r.format == "training_state"),
                     key=lambda r: r.seq, default=None)
        resumed = engine.start()
        leftovers = engine.directory.uncommitted(engine.manifest)
        staging = [p for p in engine.store.list_files() if p.startswith(".staging-")]
    finally:
        engine.close()
    if newest is not None and (resumed is None or resumed.name != newest.name):
        summary.problems.append(f"restart resumed {resumed and resumed.name}, newest committed is {newest.name}")
    elif resumed is not None and engine.directory.verify_record(resumed):
        summary.problems.append(f"resume point {resumed.name} does not verify")
    else:
        summary.resumes_ok += 1
    if leftovers or staging:
        summary.leftovers_after_restart += 1
        summary.problems.append(f"left after restart: {leftovers + staging}")


def reference_result(target: Target, workdir: str) -> tuple[object, float]:
    """The final state of an uninterrupted run, and how long that run took."""
    dirpath = os.path.join(workdir, "reference")
    out = os.path.join(workdir, "reference.out")
    started = time.monotonic()
    proc = subprocess.run(target.command(dirpath, out), cwd=ROOT, env=_env(None), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted {target.name} run failed:\n{proc.stderr[-3000:]}")
    return target.result(proc, out), time.monotonic() - started


def finish(target: Target, dirpath: str, out: str, run: int, expected: object, history: dict[int, float],
           summary: Summary, output: tuple[str, str]) -> None:
    summary.runs_completed += 1
    if target.result(subprocess.CompletedProcess([], 0, *output), out) != expected:
        summary.final_mismatch += 1
        summary.problems.append(f"run {run} ended with a different state than the uninterrupted run")
    check_directory(target, dirpath, history, summary)


def campaign(target_name: str, kills: int, seed: int = 0, workdir: str | None = None,
             phases: list[str] | None = None, random_share: float = 0.4, base: str | None = None) -> Summary:
    """Kill `kills` times: a share at random moments, the rest at exact phases (cycled).

    Runs write below `base` (a local folder or an fsspec URL; default: the work folder)."""
    target = TARGETS[target_name]()
    rng = random.Random(seed)
    summary = Summary(target=target_name)
    started = time.monotonic()
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="crash-")
    phases = phases or PHASES
    try:
        expected, typical = reference_result(target, workdir)
        run = 0
        dirpath = ""
        history: dict[int, float] = {}
        while summary.kills < kills:
            if not dirpath:
                run += 1
                dirpath = f"{base}/run{run}" if base else os.path.join(workdir, f"run{run}")
                history = {}
            out = os.path.join(workdir, f"run{run}.out")
            if rng.random() < random_share:
                fault, delay = None, rng.uniform(0.05, typical * 0.9)
                label = "random"
            else:
                label = phases[summary.kills % len(phases)]
                fault, delay = f"{label}:{rng.randint(1, 3)}", None
            proc = subprocess.Popen(target.command(dirpath, out), cwd=ROOT, env=_env(fault),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                stdout, stderr = proc.communicate(timeout=delay if delay is not None else 600)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                stdout, stderr = proc.communicate()
            if proc.returncode == -signal.SIGKILL:
                summary.kills += 1
                summary.kills_by_phase[label] = summary.kills_by_phase.get(label, 0) + 1
                check_directory(target, dirpath, history, summary)
                check_restart(target, dirpath, summary)
                continue
            if proc.returncode != 0:
                summary.problems.append(f"training failed (exit {proc.returncode}): {stderr[-2000:]}")
                summary.final_mismatch += 1
                dirpath = ""
                continue
            # the run reached its last epoch (the fault's n-th phase never came): compare and start anew
            finish(target, dirpath, out, run, expected, history, summary, (stdout, stderr))
            dirpath = ""
        if dirpath:
            # the last run was killed: the same command once more must complete it with the expected state
            proc = subprocess.run(target.command(dirpath, out), cwd=ROOT, env=_env(None), capture_output=True, text=True)
            if proc.returncode != 0:
                summary.final_mismatch += 1
                summary.problems.append(f"the final restart failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            else:
                finish(target, dirpath, out, run, expected, history, summary, (proc.stdout, proc.stderr))
    finally:
        summary.seconds = round(time.monotonic() - started, 1)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--target", choices=sorted(TARGETS), default="toy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("checkpoint_hooks").setLevel(logging.ERROR)  # the restarts' lock take-overs are expected
    summary = campaign(args.target, args.kills, seed=args.seed)
    data = asdict(summary)
    data["problems"] = data["problems"][:20]
    data["ok"] = summary.ok
    print(json.dumps(data, indent=1))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
