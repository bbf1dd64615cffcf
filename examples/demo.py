"""`make demo`: in each framework, train a tiny model with BestCheckpoint, kill the run mid-way with SIGKILL,
run the same command again (it continues), then print the checkpoint table and draw the metric.

    python examples/demo.py            # Lightning, Keras, Paddle, a plain PyTorch loop, then a framework-free one
    python examples/demo.py --quick    # fewer epochs (what the test suite runs)

Each framework runs in its own process. Outputs go to demo_output/ (printed at the end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from checkpoint_hooks.core import CheckpointDirectory, CheckpointError  # noqa: E402  (imports no framework)


def say(text: str) -> None:
    print(text, flush=True)


def committed_epochs(directory: str) -> list[int]:
    """The epochs of the committed checkpoints, as `checkpoint-hooks ls` sees them (journal included)."""
    try:
        manifest = CheckpointDirectory(directory).read_manifest()
    except (OSError, CheckpointError):
        return []  # not created yet, or caught mid-write: ask again
    return sorted({r.epoch for r in manifest.records}) if manifest is not None else []


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")


def train(command: list[str], log_path: str, kill_after_epoch: int | None) -> int:
    """Run a training command; with `kill_after_epoch`, SIGKILL it once that epoch is committed."""
    say("$ " + " ".join(os.path.relpath(c, os.getcwd()) if os.path.isabs(c) else c for c in command))
    directory = command[command.index("--dir") + 1]
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env())
        while proc.poll() is None:
            if kill_after_epoch is not None and kill_after_epoch in committed_epochs(directory):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                say(f"  killed with SIGKILL after epoch {kill_after_epoch} was committed (no cleanup ran); "
                    f"committed then: epochs {committed_epochs(directory)}")
                return proc.returncode
            time.sleep(0.05)
    if proc.returncode != 0:
        say(f"  failed with exit code {proc.returncode}; see {log_path}")
        sys.exit(proc.returncode)
    epochs = committed_epochs(directory)
    say(f"  finished: checkpoints of epochs {epochs} are kept")
    return 0


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "checkpoint_hooks.cli", *args], env=env(), check=True)


def show(name: str, directory: str) -> None:
    cli("ls", directory, "--verify")
    plot = os.path.join(os.path.dirname(directory), f"{name}.png")
    cli("plot", directory, "-o", plot)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--only", default="lightning,keras,paddle,torch,toy", help="comma-separated subset")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    epochs, kill_after = (4, 1) if args.quick else (8, 3)
    # an epoch of these tiny models takes milliseconds: each is slowed down so the kill lands mid-run
    slowed = ["--epochs", str(epochs), "--epoch-seconds", "0.5"]
    runs = {
        "lightning": [sys.executable, os.path.join(HERE, "lightning_quickstart.py"), *slowed],
        "keras": [sys.executable, os.path.join(HERE, "keras_quickstart.py"), *slowed],
        "paddle": [sys.executable, os.path.join(HERE, "paddle_quickstart.py"), *slowed],
        "torch": [sys.executable, os.path.join(HERE, "torch_quickstart.py"), *slowed],
        "toy": [sys.executable, os.path.join(HERE, "toy_training.py"), "--epochs", str(epochs)],
    }
    started = time.monotonic()
    for name in args.only.split(","):
        directory = os.path.join(out, name, "checkpoints")
        log_path = os.path.join(out, name, "training.log")
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        command = [*runs[name], "--dir", directory]
        say(f"\n== {name}: train {epochs} epochs, killed after epoch {kill_after}; then the same command again")
        if name == "toy":
            # too quick to be killed from outside at a given epoch: it ends itself abruptly instead
            code = subprocess.run([*command, "--crash-after-epoch", str(kill_after)], env=env(),
                                  capture_output=True).returncode
            say(f"  ended abruptly after epoch {kill_after} (exit code {code}, no cleanup ran)")
        else:
            train(command, log_path, kill_after_epoch=kill_after)
        train(command, log_path, kill_after_epoch=None)
        show(name, directory)
    say(f"\ndone in {time.monotonic() - started:.0f} s. Outputs are in {out}:")
    for name in args.only.split(","):
        say(f"  {name}: checkpoints/ (manifest.json and the checkpoints), {name}.png (the metric per epoch), training.log")


if __name__ == "__main__":
    main()
