"""Scale: epoch-end decision + manifest commit, and resume discovery, vs the number of records N.

    python benchmarks/scale.py            # N = 100, 1,000, 10,000, 100,000; 5 repetitions (3 at 100,000)
    python benchmarks/scale.py --quick    # N = 100, 1,000; 3 repetitions

For each N a checkpoint directory is built directly (no real saves): N committed records of
one run, as a run with `snapshots.every_n_epochs=1` (every snapshot kept), `top_k=3` and
`last=True` leaves them after N epochs, each with a real 16-byte `.ckpt` payload and its
`.meta.json` sidecar, the manifest's per-epoch history (N entries) included, written with
`CheckpointDirectory.commit`. Then:

* resume discovery: `Engine.start()` on that directory (lock, read the head, the journal and the
  base's bytes to check the head against, verify the newest training_state, adopt it), timed, with
  every file it opens recorded through an audit hook: it must open no payload but the one it
  verifies. Target at N=10,000: < 50 ms.
* first save after resume: on that started engine, the first `Engine.save()`. It parses the full
  index, which fit start left for later, and finishes the resume. Reported, no target.
* decision + commit: the next `Engine.save()` of the same engine, an epoch end of a running fit:
  retention's decision (`plan`), the write of a 16-byte file, checksum, fsync, rename, sidecar,
  the manifest commit and pruning. Target at N=10,000: <= 10 ms. Reported with its parts:
  plan; manifest_to_bytes (serialising the whole manifest, when the commit does); manifest_commit_other
  (the rest of `CheckpointDirectory.commit` / `commit_change`: write, fsync, rename); rest (write,
  checksum, fsync and rename of the payload and sidecar, retention, pruning).

Discovery and the two saves are timed alternately, each repetition on the same directory (a save adds
one record; closing the engine, untimed, folds the journal into the base).
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import _common as common
import xxhash

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.engine import Engine, SaveItem
from checkpoint_hooks.core.manifest import MANIFEST_NAME, Manifest, sidecar_bytes, sidecar_name
from checkpoint_hooks.core.records import BEST, LAST, SNAPSHOT, FileEntry, Record
from checkpoint_hooks.core.store import LocalStore
from checkpoint_hooks.policy import CheckpointPolicy

EXTENSIONS = {"training_state": ".ckpt"}
RUN = "0123456789ab"
PAYLOAD = b"tiny checkpoint!"  # 16 bytes


def policy_for(folder: str) -> CheckpointPolicy:
    return CheckpointPolicy(
        dirpath=folder, monitor="val_loss", top_k=3, snapshots={"every_n_epochs": 1}, last=True, verify=True
    )


def build(folder: str, n: int) -> None:
    """A directory holding N committed records, their payloads and sidecars, and the manifest."""
    rng = random.Random(n)
    checksum = f"xxh3_128:{xxhash.xxh3_128_hexdigest(PAYLOAD)}"
    losses = [rng.uniform(0.1, 1.0) for _ in range(n)]
    best = set(sorted(range(n), key=lambda i: losses[i])[:3])
    now = time.time()
    records = []
    history = []
    for i in range(n):
        name = f"epoch={i:06d}-val_loss={losses[i]:.4f}"
        roles = {SNAPSHOT, LAST} | ({BEST} if i in best else set())
        tags = {SNAPSHOT} | ({BEST} if i in best else set()) | ({LAST} if i == n - 1 else set())
        metrics = {"val_loss": losses[i], "train_loss": losses[i] * 1.1}
        record = Record(
            name=name,
            epoch=i,
            step=(i + 1) * 100,
            format="training_state",
            metrics=metrics,
            roles=frozenset(roles),
            tags=frozenset(tags),
            files=(FileEntry(name + ".ckpt", len(PAYLOAD), checksum),),
            created=now - (n - i),
            run=RUN,
            seq=i + 1,
        )
        records.append(record)
        history.append({"run": RUN, "epoch": i, "step": (i + 1) * 100, "metrics": metrics})
        with open(os.path.join(folder, name + ".ckpt"), "wb") as f:
            f.write(PAYLOAD)
        with open(os.path.join(folder, sidecar_name(name)), "wb") as f:
            f.write(sidecar_bytes(record))
    manifest = Manifest(records=records, policy=policy_for(folder).to_dict(), next_seq=n + 1, history=history)
    CheckpointDirectory(LocalStore(folder)).commit(manifest)


class Opens:
    """Files opened below a folder, seen through an audit hook (covers open() and os.open())."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.paths: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and self.root is not None and isinstance(args[0], str) and args[0].startswith(self.root):
            self.paths.append(os.path.relpath(args[0], self.root))

    def watch(self, root: str) -> None:
        self.root, self.paths = root, []

    def stop(self) -> list[str]:
        self.root = None
        return self.paths


def classify(paths: list[str]) -> dict[str, Any]:
    payloads = sorted({p for p in paths if p.endswith(".ckpt")})
    return {
        "opens": len(paths),
        "manifest_opens": sum(p == MANIFEST_NAME for p in paths),
        "sidecar_opens": sum(p.endswith(".meta.json") for p in paths),
        "payloads_opened": payloads,
    }


def measure(folder: str, n: int, repetitions: int, opens: Opens) -> dict[str, Any]:
    policy = policy_for(folder)
    start_opens: list[dict[str, Any]] = []
    others: set[str] = set()
    save_parts: list[dict[str, float]] = []
    epoch = [n]

    def discovery() -> float:
        engine = Engine(policy, extensions=EXTENSIONS)
        opens.watch(folder)
        started = time.perf_counter()
        record = engine.start()
        elapsed = time.perf_counter() - started
        seen = classify(opens.stop())
        engine.close()
        assert record is not None and record.run == RUN, "resume discovery did not find the run"
        start_opens.append(seen)
        others.update(p for p in seen["payloads_opened"] if p != record.primary_path)
        return elapsed

    def write(item: SaveItem, path: str) -> None:
        with open(path, "wb") as f:
            f.write(PAYLOAD)

    first_saves: list[float] = []

    def decision_commit() -> float:
        saver = Engine(policy, extensions=EXTENSIONS)
        saver.start()  # untimed: fit start, measured above
        e = epoch[0]
        started = time.perf_counter()
        saver.save(e, (e + 1) * 100, {"val_loss": 0.5, "train_loss": 0.55}, write)
        first_saves.append(time.perf_counter() - started)
        epoch[0] += 1
        parts: dict[str, float] = {"to_bytes": 0.0, "commit": 0.0}
        depth = [0]

        def timed(fn: Any, key: str) -> Any:
            def wrapped(*a: Any, **kw: Any) -> Any:
                depth[0] += key == "commit"
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    depth[0] -= key == "commit"
                    if key != "commit" or depth[0] == 0:  # a commit calling another counts once
                        parts[key] += time.perf_counter() - t

            return wrapped

        # Every way the directory commits a manifest: a full rewrite, or an incremental change where there is one.
        patched = {(Manifest, "to_bytes"): "to_bytes"}
        for name in ("commit", "commit_change"):
            if hasattr(CheckpointDirectory, name):
                patched[(CheckpointDirectory, name)] = "commit"
        originals = {target: getattr(*target) for target in patched}
        for (cls, name), key in patched.items():
            setattr(cls, name, timed(originals[(cls, name)], key))
        try:
            e = epoch[0]
            started = time.perf_counter()
            plan = saver.plan(e, (e + 1) * 100, {"val_loss": 0.5, "train_loss": 0.55})
            planned = time.perf_counter()
            records = saver.execute(plan, write)
            elapsed = time.perf_counter() - started
        finally:
            for (cls, name), original in originals.items():
                setattr(cls, name, original)
            saver.close()
        assert records, "the epoch end saved nothing"
        epoch[0] += 1
        save_parts.append(
            {
                "plan": planned - started,
                "manifest_to_bytes": parts["to_bytes"],
                "manifest_commit_other": parts["commit"] - parts["to_bytes"],
                "rest": elapsed - (planned - started) - parts["commit"],
            }
        )
        return elapsed

    times = common.alternate({"resume_discovery": discovery, "decision_commit": decision_commit}, repetitions)
    manifest_bytes = sum(
        os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder) if name.startswith("manifest.")
    )
    return {
        "N": n,
        "repetitions": repetitions,
        "manifest_bytes": manifest_bytes,
        "decision_commit_ms": round(1000 * common.median(times["decision_commit"]), 3),
        "decision_commit_parts_ms": {
            k: round(1000 * common.median([p[k] for p in save_parts]), 3) for k in save_parts[0]
        },
        "resume_discovery_ms": round(1000 * common.median(times["resume_discovery"]), 3),
        "first_save_after_resume_ms": round(1000 * common.median(first_saves), 3),
        "resume_opens": start_opens[-1],
        "resume_reads_other_payloads": sorted(set(others)),
        "runs_ms": {
            **{k: [round(1000 * v, 3) for v in vs] for k, vs in times.items()},
            "first_save_after_resume": [round(1000 * v, 3) for v in first_saves],
        },
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated N (default 100,1000,10000,100000; --quick 100,1000)")
    args = p.parse_args()
    sizes = [int(s) for s in (args.sizes or ("100,1000" if args.quick else "100,1000,10000,100000")).split(",")]
    repetitions = common.reps(args, default=5, quick=3)
    opens = Opens()
    table = []
    with common.workdir(args, "scale") as root:
        for n in sizes:
            folder = common.fresh(os.path.join(root, f"n{n}"))
            common.note(f"N={n}: building the directory ...")
            started = time.perf_counter()
            build(folder, n)
            common.note(f"N={n}: built in {time.perf_counter() - started:.1f} s; measuring ...")
            # 100,000 records cost ~40 s a round (half of it the untimed fit start before each save)
            rounds = repetitions if args.reps is not None or n < 100_000 else min(repetitions, 3)
            table.append(measure(folder, n, rounds, opens))
            common.fresh(folder)
    at = {row["N"]: row for row in table}
    targets: dict[str, Any] = {}
    if 10_000 in at:
        row = at[10_000]
        targets = {
            "decision_commit_at_10000_ms": {"measured": row["decision_commit_ms"], "target": "<= 10", "met": row["decision_commit_ms"] <= 10},
            "resume_discovery_at_10000_ms": {"measured": row["resume_discovery_ms"], "target": "< 50", "met": row["resume_discovery_ms"] < 50},
            "resume_reads_only_the_verified_payload": {
                "measured": row["resume_opens"]["payloads_opened"],
                "met": not row["resume_reads_other_payloads"] and len(row["resume_opens"]["payloads_opened"]) == 1,
            },
        }
    common.emit(
        {
            "benchmark": "scale",
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "repetitions": repetitions,
            "machine": common.machine(),
            "table": table,
            "targets": targets,
        }
    )


if __name__ == "__main__":
    main()
