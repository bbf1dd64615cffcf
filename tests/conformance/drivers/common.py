"""What every conformance driver shares: the command line, the data, the digest and the result file.

Imports no training framework, so a driver imports exactly one. The command line is the same
for every adapter:

    python -m tests.conformance.drivers.<adapter> --dir D --epochs N --out result.json
        [--policy JSON] [--kill-after-epoch K] [--kill-at-step S] [--sigterm-at-step S] [--raise-at-step S]

Steps count optimizer steps, as the frameworks' global step does: "at step S" means once S
steps are done. `--kill-at-step S` sends SIGKILL before the batch after step S starts (after any
save at step S); `--sigterm-at-step S` sends SIGTERM at the end of the batch that completes
step S; `--raise-at-step S` raises RuntimeError("boom") in the forward pass of the training
batch that would complete step S + 1. `--kill-after-epoch K` sends SIGKILL once epoch K's
checkpoint is committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLES = 256
VAL_SAMPLES = 64
FEATURES = 4  # tests.lightning.models and tests.paddle.toy networks take 4 inputs
BATCH = 32
STEPS_PER_EPOCH = SAMPLES // BATCH
SEED = 7
# Keyword arguments every run's BestCheckpoint gets; --policy overrides them.
DEFAULT_POLICY: dict[str, Any] = {"monitor": "val_loss", "mode": "min", "top_k": 2}


@dataclass
class Args:
    dir: str
    epochs: int
    out: str
    policy: dict[str, Any]
    kill_after_epoch: int | None
    kill_at_step: int | None
    sigterm_at_step: int | None
    raise_at_step: int | None

    def checkpoint_kwargs(self) -> dict[str, Any]:
        """What the driver passes to BestCheckpoint(**kwargs)."""
        return {"dirpath": self.dir, **DEFAULT_POLICY, **self.policy}


def parse_args(argv: Sequence[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--policy", type=json.loads, default={}, help="BestCheckpoint keyword arguments, as JSON")
    parser.add_argument("--kill-after-epoch", type=int, default=None)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--sigterm-at-step", type=int, default=None)
    parser.add_argument("--raise-at-step", type=int, default=None)
    ns = parser.parse_args(argv)
    if ns.kill_after_epoch is not None and not 0 <= ns.kill_after_epoch < ns.epochs - 1:
        parser.error("--kill-after-epoch K needs 0 <= K < epochs - 1 (the kill happens when epoch K + 1 starts)")
    return Args(**vars(ns))


def setup_process() -> None:
    """Quiet framework noise, and make sure our warnings reach stderr whatever handlers a framework installs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logger = logging.getLogger("checkpoint_hooks")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy linear regression, float32: x of shape (n, FEATURES), y of shape (n, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    w = np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    y = (x @ w + 0.1 * rng.standard_normal((n, 1))).astype("float32")
    return x, y


def train_set() -> tuple[np.ndarray, np.ndarray]:
    return dataset(SAMPLES, seed=0)


def validation_set() -> tuple[np.ndarray, np.ndarray]:
    """Targets of the opposite sign: val_loss rises while the model learns, so the best epochs are the
    oldest and keeping the top k by value cannot pass for keeping the newest k."""
    x, y = dataset(VAL_SAMPLES, seed=1)
    return x, -y


def digest(named: Iterable[tuple[str, np.ndarray]]) -> str:
    """sha256 of names, dtypes, shapes and bytes of the arrays, in the order given."""
    h = hashlib.sha256()
    for name, array in named:
        array = np.ascontiguousarray(array)
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def die(sig: int) -> None:
    """Send `sig` to this process (SIGKILL ends it here; SIGTERM is up to the handlers)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


@dataclass
class Progress:
    """What the training in this process did: batches per epoch and the logged val_loss per epoch."""

    batches: dict[int, int] = field(default_factory=dict)
    val_loss: dict[int, float] = field(default_factory=dict)

    def batch_done(self, epoch: int) -> None:
        self.batches[epoch] = self.batches.get(epoch, 0) + 1

    def write(self, args: Args, *, digest: str, best_model_path: str, global_step: int, shuffled: bool,
              extra: Mapping[str, Any] | None = None) -> None:
        result = {
            "digest": digest,
            "best_model_path": os.path.abspath(best_model_path) if best_model_path else "",
            "trained_epochs": sorted(self.batches),
            "batches": {str(k): v for k, v in sorted(self.batches.items())},
            "val_loss": {str(k): v for k, v in sorted(self.val_loss.items())},
            "global_step": global_step,
            "shuffled": shuffled,
            **(extra or {}),
        }
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

