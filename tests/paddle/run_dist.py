"""A two-rank CPU run under `python -m paddle.distributed.launch --nproc_per_node 2 run_dist.py D N OUT`.

Each rank writes OUT.rank<r>.npz (parameters and optimizer state) and OUT.rank<r>.json
(epochs trained, the resume record, the steps of the manifest's records as this rank saw them).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import paddle.distributed as dist

from checkpoint_hooks.paddle import BestCheckpoint
from tests.paddle.toy import Recorder, Regression, portable_state, regression_model


def main(directory: str, epochs: int, out: str) -> None:
    model = regression_model(0)
    recorder = Recorder()
    callback = BestCheckpoint(dirpath=directory, top_k=-1)
    model.fit(Regression(), Regression(16, seed=1), batch_size=8, epochs=epochs, verbose=0, shuffle=True,
              callbacks=[callback, recorder])
    rank = dist.get_rank()
    np.savez(f"{out}.rank{rank}.npz", **portable_state(model))
    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as f:
        json.dump({"trained": recorder.trained, "resumed_from": callback.resumed_from.name if callback.resumed_from else None,
                   "world_size": dist.get_world_size(), "writer": callback.engine.is_writer}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
