"""Run each test suite in its own pytest process and print one closing line for all of them.

Usage: python -m tests.run_suites [suite ...]   (default: every suite below)

Suites run two at a time (`CH_TEST_JOBS` sets how many; 1 runs them one after another),
longest first, so that a short one fills the time a long one leaves. Each suite's output
is printed whole as soon as it ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

SUITES = ["core", "cli", "lightning", "keras", "paddle", "torch", "reliability", "conformance", "docs"]
# longest first (seconds on 2 cores, roughly): the order they are started in
LONGEST_FIRST = ["conformance", "lightning", "keras", "reliability", "docs", "paddle", "torch", "cli", "core"]
COUNTS = re.compile(r"(\d+) (passed|failed|error|errors|skipped)")


def run(suite: str) -> tuple[int, dict[str, int], str]:
    path = os.path.join("tests", suite)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts: dict[str, int] = {}
    for number, kind in COUNTS.findall(last):
        kind = "errors" if kind.startswith("error") else kind
        counts[kind] = counts.get(kind, 0) + int(number)
    report = f"==> tests/{suite}\n{proc.stdout}<== tests/{suite}: exit {proc.returncode} in {time.monotonic() - started:.0f} s\n"
    # pytest exits 5 when a suite collected nothing: not a failure of the run
    return (0 if proc.returncode == 5 else proc.returncode), counts, report


def main(argv: list[str]) -> int:
    suites = argv or [s for s in SUITES if os.path.isdir(os.path.join("tests", s))]
    order = sorted(suites, key=lambda s: LONGEST_FIRST.index(s) if s in LONGEST_FIRST else -1)
    jobs = max(1, int(os.environ.get("CH_TEST_JOBS", "2")))
    started = time.monotonic()
    total: dict[str, int] = {}
    failed_suites = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, suite): suite for suite in order}
        for future in as_completed(futures):
            suite, (code, counts, report) = futures[future], future.result()
            sys.stdout.write(report)
            sys.stdout.flush()
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
            if code != 0:
                failed_suites.append(suite)
    failed = total.get("failed", 0) + total.get("errors", 0)
    if failed_suites and not failed:
        failed = len(failed_suites)  # a suite that crashed before pytest could count
    if failed_suites:
        print(f"failed suites: {', '.join(failed_suites)}")
    line = f"{total.get('passed', 0)} passed, {failed} failed"
    if total.get("skipped"):
        line += f", {total['skipped']} skipped"
    print(f"all suites in {time.monotonic() - started:.0f} s ({jobs} at a time)")
    print(f"total: {line}")
    return 1 if failed_suites else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
