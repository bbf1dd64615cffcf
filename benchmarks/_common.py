"""Shared helpers of the benchmark scripts: argument parsing, alternating A/B repetitions, medians, JSON output.

Every benchmark measures its target as a ratio against a baseline timed in the
same process, alternating the variants repetition by repetition (the order
rotates each round) so that a slow moment of a shared machine hits every
variant alike, and reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MiB = 1024 * 1024
GiB = 1024 * MiB


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions: a smoke test in under ~30 s")
    p.add_argument("--reps", type=int, default=None, help="repetitions per variant (default: see the script's docstring; --quick 2)")
    p.add_argument(
        "--dir",
        default=None,
        help="where the benchmark writes its files (default: a fresh folder under the system temp directory)",
    )
    return p


def add_device(p: argparse.ArgumentParser) -> None:
    """`--device cpu|cuda`: where the benchmark's tensors (or model) live."""
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the state's tensors live (default: cuda when a CUDA device is visible, else cpu, noted in the JSON)",
    )


def device(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The device `--device` asks for (or the default) and the JSON fields that say which it was.

    Asking for cuda where none is visible ends the run with one line naming the fix.
    """
    import torch  # here: the Keras and Paddle benchmarks import this module without torch

    visible = torch.cuda.is_available()
    if args.device == "cuda" and not visible:
        raise SystemExit("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False); use --device cpu")
    chosen = args.device or ("cuda" if visible else "cpu")
    fields: dict[str, Any] = {"device": chosen}
    if args.device is None and not visible:
        fields["device_note"] = "no CUDA device; measured on CPU"
    if chosen == "cuda":
        fields["device_name"] = torch.cuda.get_device_name()
    return chosen, fields


def synchronize(device: str) -> None:
    """Wait for the work queued on the current CUDA stream, the training's (timings then include it); nothing on CPU.

    Other streams (a background save's copies) are not waited for.
    """
    if device == "cuda":
        import torch

        torch.cuda.current_stream().synchronize()


def reps(args: argparse.Namespace, default: int = 5, quick: int = 2) -> int:
    return args.reps if args.reps is not None else (quick if args.quick else default)


@contextmanager
def workdir(args: argparse.Namespace, prefix: str) -> Iterator[str]:
    """A scratch folder, removed afterwards."""
    base = args.dir
    if base is not None:
        os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"checkpoint_hooks-bench-{prefix}-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fresh(path: str) -> str:
    """`path` as an empty directory."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def alternate(
    variants: Mapping[str, Callable[[], float | None]],
    repetitions: int,
    between: Callable[[], None] | None = None,
    log: bool = True,
) -> dict[str, list[float]]:
    """Run every variant `repetitions` times, interleaved round by round.

    Two variants strictly alternate (AB, BA, AB, ...); with more, each round runs them in a
    shuffled order (fixed seed), so that no variant always follows the same one.
    A variant returns the seconds it measured itself, or None to be timed as a whole call.
    `between` runs untimed after every call (e.g. `os.sync()` so that dirty pages of one
    variant are not flushed while the next one is being timed).
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    shuffler = random.Random(0)
    for rep in range(repetitions):
        if len(names) == 2:
            order = names if rep % 2 == 0 else names[::-1]
        else:
            order = names[:]
            shuffler.shuffle(order)
        for name in order:
            started = time.perf_counter()
            measured = variants[name]()
            elapsed = time.perf_counter() - started if measured is None else measured
            times[name].append(elapsed)
            if between is not None:
                between()
            if log:
                print(f"  rep {rep + 1}/{repetitions} {name}: {elapsed:.4f} s", file=sys.stderr, flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and every value (seconds, rounded for reading)."""
    return {
        "median_s": round(median(values), 6),
        "min_s": round(min(values), 6),
        "max_s": round(max(values), 6),
        "runs_s": [round(v, 6) for v in values],
    }


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Ratio of medians."""
    return round(median(numerator) / median(denominator), 4)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios: each round ran both variants back to back."""
    return round(median([a / b for a, b in zip(numerator, denominator)]), 4)


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], draws: int = 2000) -> list[float]:
    """A 95% bootstrap interval of the ratio of medians: how far the noise of this run lets it move.

    Each draw resamples the runs of both variants with replacement (fixed seed).
    """
    rng = random.Random(0)
    ratios = sorted(
        median(rng.choices(numerator, k=len(numerator))) / median(rng.choices(denominator, k=len(denominator)))
        for _ in range(draws)
    )
    return [round(ratios[int(0.025 * draws)], 4), round(ratios[int(0.975 * draws) - 1], 4)]


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in load] if load else None,
    }


def emit(result: Mapping[str, Any]) -> None:
    """The benchmark's figures as JSON on stdout (progress goes to stderr)."""
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class HookTimer:
    """Time spent inside an object's methods, outermost calls only (a hook calling another is counted once).

    Wraps the methods as instance attributes, which is how frameworks look hooks up
    (`getattr(callback, "on_epoch_end")(...)`).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - started
                    self.calls += 1

        return wrapped

    def attach(self, obj: Any, names: Sequence[str]) -> Any:
        for name in names:
            method = getattr(obj, name, None)
            if callable(method):
                setattr(obj, name, self.wrap(method))
        return obj


def hook_names(obj: Any, extra: Sequence[str] = ()) -> list[str]:
    """The `on_*` hooks of a callback plus `extra` names."""
    return [n for n in dir(obj) if n.startswith("on_") and callable(getattr(obj, n, None))] + list(extra)


def fit_overhead_result(
    header: Mapping[str, Any],
    times: Mapping[str, Sequence[float]],
    callback_time: Mapping[str, Sequence[float]],
    epochs: int,
    files: Mapping[str, Any],
) -> dict[str, Any]:
    """The figures every fit_overhead_* script reports: fit times and ratios of ours (and ours_async) to native."""
    result: dict[str, Any] = {**header, "fit_s": {name: summary(values) for name, values in times.items()}}
    for ours in (name for name in ("ours", "ours_async") if name in times):
        result[f"ratio_{ours}_over_native"] = ratio(times[ours], times["native"])
        result[f"ratio_{ours}_over_native_95ci"] = ratio_interval(times[ours], times["native"])
        result[f"paired_ratio_{ours}_over_native"] = paired_ratio(times[ours], times["native"])
        result[f"ratio_{ours}_over_none"] = ratio(times[ours], times["none"])
    result["ratio_native_over_none"] = ratio(times["native"], times["none"])
    result["target"] = "ours/native <= 1.00"
    result["met"] = result["ratio_ours_over_native"] <= 1.00
    if "ours_async" in times:
        result["met_with_async_save"] = result["ratio_ours_async_over_native"] <= 1.00
    result["checkpoint_callback_s"] = {name: summary(values) for name, values in callback_time.items()}
    result["checkpoint_callback_ms_per_epoch"] = {
        name: round(1000 * median(values) / epochs, 2) for name, values in callback_time.items()
    }
    result["files_left"] = files
    return result


def header(benchmark: str, **fields: Any) -> dict[str, Any]:
    """What every benchmark's JSON starts with: its name, the command that ran it, versions, the machine."""
    return {
        "benchmark": benchmark,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        **fields,
        "machine": machine(),
    }
