"""`checkpoint-hooks plot`: the monitored metric per epoch, with the kept checkpoints marked."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from checkpoint_hooks.core.manifest import Manifest
from checkpoint_hooks.core.records import BEST, LAST, SNAPSHOT, Record

NEEDS_MATPLOTLIB = "plot needs matplotlib: pip install 'checkpoint-hooks[cli]'"


class OutputError(ValueError):
    """The image cannot be written where `-o` points: a missing folder, an unknown format, no permission."""


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


def metric_names(manifest: Manifest, run: str) -> list[str]:
    """Every metric with at least one value in `run` (history or records), sorted."""
    names = {name for entry in manifest.history if entry.get("run") == run for name in entry["metrics"]}
    names.update(name for record in manifest.run_records(run) for name in record.metrics)
    return sorted(names)


def check_output(output: str) -> None:
    """Refuse an image path before anything is drawn: its folder must exist and its extension name a format."""
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise OutputError(
            f"cannot write {output!r}: the folder {folder!r} does not exist or is not a folder; create it or choose another -o"
        )
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise SystemExit(NEEDS_MATPLOTLIB) from None

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    extension = os.path.splitext(output)[1].lstrip(".").lower()
    if extension not in formats:
        problem = f".{extension} is not an image format" if extension else "the name has no extension"
        raise OutputError(f"cannot write {output!r}: {problem}; end -o with one of .{', .'.join(formats)} (e.g. metrics.png)")


def _label(name: str) -> str:
    """A metric or directory name as matplotlib text: printable, and `$` shown as itself (not math mode)."""
    from checkpoint_hooks.core.paths import printable

    return printable(name).replace("$", r"\$")


def plot(manifest: Manifest, run: str, monitor: str, output: str, extra: Sequence[str] = (), title: str = "") -> None:
    """Draw `monitor` (and `extra` metrics) per epoch of `run` into `output` (PNG, SVG or PDF)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(NEEDS_MATPLOTLIB) from None

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        _draw(ax, manifest, run, monitor, extra, title)
        fig.tight_layout()
        fig.savefig(output)
    except OSError as exc:
        raise OutputError(f"cannot write {output!r}: {exc.strerror or exc}; choose another -o") from None
    finally:
        plt.close(fig)


def _draw(ax: Any, manifest: Manifest, run: str, monitor: str, extra: Sequence[str], title: str) -> None:
    epochs, values = series(manifest, run, monitor)
    ax.plot(epochs, values, "-", color="#4c72b0", label=_label(monitor), zorder=1)
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
            ax.plot(xs, ys, "--", alpha=0.7, label=_label(name), zorder=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(_label(monitor))
    ax.set_title(_label(title) if title else f"{_label(monitor)} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
