"""`checkpoint-hooks plot`: the monitored metric per epoch, with the kept checkpoints marked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from checkpoint_hooks.core.manifest import Manifest
from checkpoint_hooks.core.records import BEST, LAST, SNAPSHOT, Record


def series(manifest: Manifest, run: str, name: str) -> tuple[list[int], list[float]]:
    """Epochs and values of one metric in one run: the history, or the records when it has none."""
    points: dict[int, float] = {}
    for entry in manifest.history:
        if entry.get("run") == run and name in entry["metrics"]:
            points[int(entry["epoch"])] = float(entry["metrics"][name])
    for record in manifest.run_records(run):
        if name in record.metrics:
            points.setdefault(record.epoch, float(record.metrics[name]))
    epochs = sorted(points)
    return epochs, [points[e] for e in epochs]


def plot(manifest: Manifest, run: str, monitor: str, output: str, extra: Sequence[str] = (), title: str = "") -> None:
    """Draw `monitor` (and `extra` metrics) per epoch of `run` into `output` (PNG, SVG or PDF)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot needs matplotlib: pip install 'checkpoint-hooks[cli]'") from None

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    epochs, values = series(manifest, run, monitor)
    ax.plot(epochs, values, "-", color="#4c72b0", label=monitor, zorder=1)
    records = manifest.run_records(run)
    markers: list[tuple[str, str, str, dict[str, Any]]] = [
        (BEST, "kept best (top-k)", "*", {"s": 180, "color": "#dd8452"}),
        (SNAPSHOT, "snapshot", "^", {"s": 70, "color": "#55a868"}),
        (LAST, "last", "o", {"s": 90, "facecolors": "none", "edgecolors": "#c44e52", "linewidths": 2}),
    ]
    for tag, label, marker, style in markers:
        chosen: list[Record] = [r for r in records if tag in r.tags and monitor in r.metrics]
        xs = [r.epoch for r in chosen]
        ys = [float(r.metrics[monitor]) for r in chosen]
        ys = [y if math.isfinite(y) else float("nan") for y in ys]
        if xs:
            ax.scatter(xs, ys, marker=marker, label=label, zorder=3, **style)
    for name in (m for m in extra if m != monitor):
        xs, ys = series(manifest, run, name)
        if xs:
            ax.plot(xs, ys, "--", alpha=0.7, label=name, zorder=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(monitor)
    ax.set_title(title or f"{monitor} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
