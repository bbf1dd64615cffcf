"""Run each test suite in its own pytest process and print one closing line for all of them.

Usage: python -m tests.run_suites [suite ...]   (default: every suite below)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

SUITES = ["core", "cli", "lightning", "keras", "paddle", "torch", "reliability", "conformance", "docs"]
COUNTS = re.compile(r"(\d+) (passed|failed|error|errors|skipped)")


def run(suite: str) -> tuple[int, dict[str, int]]:
    path = os.path.join("tests", suite)
    started = time.monotonic()
    print(f"==> tests/{suite}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    sys.stdout.write(proc.stdout)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts: dict[str, int] = {}
    for number, kind in COUNTS.findall(last):
        kind = "errors" if kind.startswith("error") else kind
        counts[kind] = counts.get(kind, 0) + int(number)
    print(f"<== tests/{suite}: exit {proc.returncode} in {time.monotonic() - started:.0f} s", flush=True)
    # pytest exits 5 when a suite collected nothing: not a failure of the run
    return (0 if proc.returncode == 5 else proc.returncode), counts


def main(argv: list[str]) -> int:
    suites = argv or [s for s in SUITES if os.path.isdir(os.path.join("tests", s))]
    total: dict[str, int] = {}
    failed_suites = []
    for suite in suites:
        code, counts = run(suite)
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
    print(f"total: {line}")
    return 1 if failed_suites else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
