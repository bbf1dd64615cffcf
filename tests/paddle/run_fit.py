"""One training run in its own process, for the kill-and-resume tests.

    python -m tests.paddle.run_fit --dir D --out O [--epochs N] [--kill-after K] [--variant plain|shuffled]

Trains the toy regression with BestCheckpoint (resume="auto") and writes O.npz
(parameters and optimizer state by structured name) and O.json (epochs trained,
the resume record, the manifest's records, the directory listing). With
--kill-after K the process SIGKILLs itself once epoch K is saved.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np
import paddle

from checkpoint_hooks.paddle import BestCheckpoint
from tests.paddle.toy import (
    VAL_OFFSETS,
    Recorder,
    Regression,
    listing,
    manifest_records,
    portable_state,
    regression_model,
)


class KillAfter(paddle.callbacks.Callback):
    """SIGKILL at the start of epoch K+1, after BestCheckpoint (listed before it) saved epoch K."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
        if epoch == self.epoch + 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--variant", choices=["plain", "shuffled"], default="plain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    shuffled = args.variant == "shuffled"
    model = regression_model(args.seed, dropout=shuffled)
    eval_data = Regression(16, seed=1, offsets=VAL_OFFSETS)
    recorder = Recorder(eval_data)
    # The default names: numbers without a dot (val_loss=0_1234), which Model.load(prefix) reads.
    callback = BestCheckpoint(monitor="val_loss", dirpath=args.dir, top_k=2, snapshots={"every_n_epochs": 2, "keep": 1})
    callbacks: list[paddle.callbacks.Callback] = [callback, recorder]
    if shuffled:
        # A per-epoch schedule stepped by hapi's LRScheduler callback after BestCheckpoint's epoch end.
        callbacks.append(paddle.callbacks.LRScheduler(by_step=False, by_epoch=True))
    if args.kill_after is not None:
        callbacks.append(KillAfter(args.kill_after))
    model.fit(Regression(), eval_data, batch_size=8, epochs=args.epochs, verbose=0, shuffle=shuffled,
              callbacks=callbacks)

    np.savez(args.out + ".npz", **portable_state(model))
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(
            {
                "trained": recorder.trained,
                "resumed_from": callback.resumed_from.name if callback.resumed_from else None,
                "records": manifest_records(args.dir),
                "listing": listing(args.dir),
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
