"""`make demo`: train, crash mid-way, run the same command again, and look at what was kept.

Outputs go to demo_output/ (printed at the end).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.abspath("demo_output")


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    print("$ " + " ".join(os.path.relpath(c) if os.path.exists(c) else c for c in cmd), flush=True)
    proc = subprocess.run(cmd, text=True)
    if check and proc.returncode != 0:
        sys.exit(proc.returncode)
    return proc


def toy() -> None:
    directory = os.path.join(OUT, "toy")
    script = os.path.join(HERE, "toy_training.py")
    print("\n== a framework-free loop on the engine: crash after epoch 4, then the same command again")
    crashed = run([sys.executable, script, "--dir", directory, "--epochs", "8", "--crash-after-epoch", "4"], check=False)
    print(f"(the first run ended abruptly with exit code {crashed.returncode})")
    run([sys.executable, script, "--dir", directory, "--epochs", "8"])
    run([sys.executable, "-m", "checkpoint_hooks.cli", "ls", directory, "--verify"])
    run([sys.executable, "-m", "checkpoint_hooks.cli", "best", directory])


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    toy()
    print(f"\noutputs are in {OUT}")


if __name__ == "__main__":
    main()
