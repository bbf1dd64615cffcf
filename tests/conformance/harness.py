"""Runs the conformance drivers as child processes, a few at a time, and keeps what each run left.

Importing TensorFlow and Paddle in one process crashes, so every framework runs in a child
(`python -m tests.conformance.drivers.<adapter>`); this module imports no framework. The
children of one test module share a small pool: most of a run is importing its framework, on one
core, so two at a time halve the wall time on two cores. A run that follows another (a rerun in the
same directory, a run in a copy of another's directory) is queued once that one ended.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.records import Record

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
WORKERS = max(1, min(2, os.cpu_count() or 1))


@dataclass
class Run:
    """One finished child process and the checkpoint directory as it left it."""

    adapter: str
    name: str
    dir: Path
    returncode: int
    stderr: str
    seconds: float
    result: dict[str, Any] | None  # the driver's result.json; None when the process did not get to its end
    records: list[Record]  # the directory's committed records right after this run (later runs may change it)
    problems: list[str]  # files of those records that do not verify
    notes: dict[str, Any] = field(default_factory=dict)  # what the preparation chose (a corrupted file, a path)

    def records_tagged(self, tag: str) -> list[Record]:
        return [r for r in self.records if tag in r.tags]

    def describe(self) -> str:
        """The end of stderr, for assertion messages."""
        return f"{self.adapter}/{self.name}: exit {self.returncode} after {self.seconds:.0f} s\n{self.stderr[-4000:]}"


# prepare(its directory, the run it follows) -> (policy overrides, notes); called before the child starts
Prepare = Callable[[Path, "Run | None"], tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class Spec:
    """How to make one run: driver flags and policy, and where its directory comes from.

    `after`: the run this one starts after. `directory`: "own" (a new one), "same" (goes on in the
    directory of `after`), or "copy" (a copy of it, so `after`'s stays as that run left it).
    """

    epochs: int
    policy: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, int] = field(default_factory=dict)
    after: str | None = None
    directory: Literal["own", "same", "copy"] = "own"
    prepare: Prepare | None = None


def command(adapter: str, dirpath: Path, out: Path, epochs: int, policy: Mapping[str, Any],
            flags: Mapping[str, int]) -> list[str]:
    cmd = [sys.executable, "-m", f"tests.conformance.drivers.{adapter}", "--dir", str(dirpath),
           "--epochs", str(epochs), "--out", str(out)]
    if policy:
        cmd += ["--policy", json.dumps(dict(policy))]
    for flag, value in flags.items():
        cmd += ["--" + flag.replace("_", "-"), str(value)]
    return cmd


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="2",
               PL_DISABLE_FORK="1")
    # one compute thread per child: two children share two cores, and no run depends on thread timing
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                 "TF_NUM_INTEROP_THREADS"):
        env[name] = "1"
    return env


def snapshot(dirpath: Path) -> tuple[list[Record], list[str]]:
    """The committed records of a directory and the problems of their files (none without a manifest)."""
    directory = CheckpointDirectory(str(dirpath))
    manifest = directory.read_manifest() if dirpath.is_dir() else None
    if manifest is None:
        return [], []
    return manifest.records, [str(p) for p in directory.verify(manifest.records)]


class Runs:
    """The runs of one test module, by (adapter, name), each made at most once."""

    def __init__(self, workdir: Path, specs: Mapping[str, Spec], workers: int = WORKERS) -> None:
        self.workdir = workdir
        self.specs = specs
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="conformance")
        self.futures: dict[tuple[str, str], Future[Run]] = {}

    def prefetch(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Start these runs (and what they need) now, so they go on while earlier tests check theirs."""
        for adapter, name in wanted:
            self.future(adapter, name)

    def get(self, adapter: str, name: str) -> Run:
        return self.future(adapter, name).result()

    def future(self, adapter: str, name: str) -> Future[Run]:
        key = (adapter, name)
        if key not in self.futures:
            after = self.specs[name].after
            if after is None:
                self.futures[key] = self.pool.submit(self._make, adapter, name, None)
            else:
                self.futures[key] = self._then(self.future(adapter, after), adapter, name)
        return self.futures[key]

    def _then(self, first: Future[Run], adapter: str, name: str) -> Future[Run]:
        """The run `name`, queued once `first` ended (no worker sits waiting for another)."""
        outer: Future[Run] = Future()

        def make() -> Run:
            return self._make(adapter, name, first.result())

        def start(_: Future[Run]) -> None:
            try:
                inner = self.pool.submit(make)
            except RuntimeError as exc:  # the pool was shut down: the module's tests are over
                outer.set_exception(exc)
                return
            inner.add_done_callback(functools.partial(_transfer, target=outer))

        first.add_done_callback(start)
        return outer

    def _make(self, adapter: str, name: str, before: Run | None) -> Run:
        spec = self.specs[name]
        base = self.workdir / adapter
        base.mkdir(parents=True, exist_ok=True)
        dirpath = base / name
        if spec.directory != "own":
            assert before is not None, f"{name}: directory={spec.directory!r} needs `after`"
            if spec.directory == "same":
                dirpath = before.dir
            else:
                shutil.copytree(before.dir, dirpath)
        policy: dict[str, Any] = dict(spec.policy)
        notes: dict[str, Any] = {}
        if spec.prepare is not None:
            extra, notes = spec.prepare(dirpath, before)
            policy.update(extra)
        out = base / f"{name}.json"
        started = time.monotonic()
        proc = subprocess.run(command(adapter, dirpath, out, spec.epochs, policy, spec.flags), cwd=ROOT,
                              env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=TIMEOUT_S)
        seconds = time.monotonic() - started
        result = json.loads(out.read_text(encoding="utf-8")) if out.exists() else None
        records, problems = snapshot(dirpath)
        return Run(adapter, name, dirpath, proc.returncode, proc.stderr, seconds, result, records, problems, notes)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _transfer(source: Future[Run], target: Future[Run]) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())

