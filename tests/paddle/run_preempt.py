"""One training run in its own process, for the SIGTERM tests.

    python -m tests.paddle.run_preempt --dir D --out O [--epochs N] [--sigterm-at S] [--workers W]

Trains the toy regression (4 batches an epoch, no shuffling) with BestCheckpoint
(resume="auto", every epoch kept) and, when fit() returns, writes O.npz (parameters
and optimizer state by structured name) and O.json (epochs trained, the resume
record). With --sigterm-at S the process sends itself SIGTERM at the end of the
S-th training batch of this fit. --workers W loads the data in W worker
processes (a DataLoader with num_workers=W, the same batches). Under `paddle.distributed.launch` only rank 0 does,
and the files are O.rank<r>.npz and O.rank<r>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

import numpy as np
import paddle

from checkpoint_hooks.paddle import BestCheckpoint
from tests.paddle.toy import Recorder, Regression, portable_state, regression_model


class SigtermAt(paddle.callbacks.Callback):
    """SIGTERM to this process at the end of the n-th training batch."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.seen = 0

    def on_train_batch_end(self, step: int, logs: Any = None) -> None:
        self.seen += 1
        if self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sigterm-at", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)

    model = regression_model(0)
    recorder = Recorder()
    callback = BestCheckpoint(dirpath=args.dir, top_k=-1)
    callbacks: list[paddle.callbacks.Callback] = [callback, recorder]
    if args.sigterm_at is not None and paddle.distributed.get_rank() == 0:
        callbacks.append(SigtermAt(args.sigterm_at))
    data: Any = Regression()
    if args.workers:
        data = paddle.io.DataLoader(data, batch_size=8, shuffle=False, num_workers=args.workers)
    model.fit(data, batch_size=8, epochs=args.epochs, verbose=0, shuffle=False, callbacks=callbacks)

    out = args.out if paddle.distributed.get_world_size() == 1 else f"{args.out}.rank{paddle.distributed.get_rank()}"
    np.savez(out + ".npz", **portable_state(model))
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(
            {"trained": recorder.trained, "resumed_from": callback.resumed_from.name if callback.resumed_from else None},
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
