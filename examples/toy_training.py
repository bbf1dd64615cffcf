"""A framework-free training loop on the checkpoint_hooks engine: linear regression by SGD in plain Python.

Shows the engine's contract without any framework, and serves the demo and the
crash tests: run it, kill it at any moment, run it again, and it continues.

    python examples/toy_training.py --dir runs/toy --epochs 8 [--crash-after-epoch 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine

DATA = [(x / 10, 3.0 * x / 10 - 1.0 + random.Random(x).gauss(0, 0.1)) for x in range(-20, 20)]


def train_epoch(state: dict, rng: random.Random) -> float:
    order = list(range(len(DATA)))
    rng.shuffle(order)
    for i in order:
        x, y = DATA[i]
        error = state["w"] * x + state["b"] - y
        state["w"] -= state["lr"] * error * x
        state["b"] -= state["lr"] * error
        state["step"] += 1
    state["lr"] *= 0.9  # a schedule, restored with the rest
    return sum((state["w"] * x + state["b"] - y) ** 2 for x, y in DATA) / len(DATA)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--crash-after-epoch", type=int, default=None, help="exit abruptly after this epoch's save")
    parser.add_argument("--policy", default=None, help="a policy YAML file instead of the built-in one")
    parser.add_argument("--payload-bytes", type=int, default=0, help="pad each checkpoint (to widen the write window)")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.policy:
        policy = CheckpointPolicy.from_yaml(args.policy).model_copy(update={"dirpath": args.dir})
    else:
        policy = CheckpointPolicy(dirpath=args.dir, monitor="val_loss", top_k=2, snapshots={"every_n_epochs": 3},
                                  verbose=True, async_save=args.async_save)
    engine = Engine(policy, extensions={"training_state": ".json"})
    state = {"w": 0.0, "b": 0.0, "lr": 0.05, "step": 0, "epoch": -1, "rng": None}
    rng = random.Random(0)
    resumed = engine.start()
    if resumed is not None:
        with open(engine.local_path(resumed)) as f:
            state = json.load(f)["state"]
        rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
    padding = "x" * args.payload_bytes

    def snapshot(item):
        # what the training loop pays for in the background mode: a copy of the state
        return json.dumps({"state": state, "padding": padding})

    def write(item, path):
        with open(path, "w") as f:
            f.write(snapshot(item))

    def write_snapshot(item, payload, path):
        with open(path, "w") as f:
            f.write(payload)

    try:
        for epoch in range(state["epoch"] + 1, args.epochs):
            val_loss = train_epoch(state, rng)
            state["epoch"] = epoch
            state["rng"] = rng.getstate()
            plan = engine.plan(epoch, state["step"], {"val_loss": val_loss})
            if policy.async_save:
                engine.execute_async(plan, snapshot, write_snapshot)
            else:
                engine.execute(plan, write)
            if args.crash_after_epoch == epoch:
                engine.wait()
                os._exit(17)  # no cleanup at all, like a SIGKILL
    finally:
        engine.close()
    print(json.dumps({"w": state["w"], "b": state["b"], "epoch": state["epoch"], "step": state["step"]}))


if __name__ == "__main__":
    main()
