"""BestCheckpoint's arguments: ModelCheckpoint's spellings mapped onto the shared policy.

A ModelCheckpoint argument left at its default is a `Default`, so a policy's own
value can take its place; one the user gave overrides the policy. The file
extension, `save_weights_only` and `format` must agree (`settle_format`); a
legacy `.h5` name asks for HDF5 models, which hold no optimizer state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from checkpoint_hooks.core.store import is_url
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, load_policy, metric_direction, template_fields

WEIGHTS_EXT = ".weights.h5"
KERAS_EXT = ".keras"
LEGACY_EXT = ".h5"


class Default:
    """A ModelCheckpoint argument left at its default: a policy's own value takes its place."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def given(value: Any) -> bool:
    return not isinstance(value, Default)


def plain(value: Any) -> Any:
    return value.value if isinstance(value, Default) else value


def split_extension(name: str) -> tuple[str, str | None]:
    """`name` without a Keras extension, and that extension (weights before legacy: both end in .h5)."""
    for ext in (WEIGHTS_EXT, KERAS_EXT, LEGACY_EXT):
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return name, None


def build_policy(
    filepath: str | os.PathLike[str] | None,
    fields: dict[str, Any],
    *,
    policy: CheckpointPolicy | Mapping[str, Any] | str | Path | None,
    monitor: Any,
    mode: str,
    save_best_only: Any,
    verbose: Any,
    weights_only: bool,
    save_freq: str | int,
    export_best: bool,
) -> tuple[CheckpointPolicy, bool]:
    """The policy BestCheckpoint's arguments ask for, and whether its models are legacy `.h5` files.

    Args:
        filepath: ModelCheckpoint's path template (gives dirpath, filename and extension), or None.
        fields: the policy fields given after the `*` (None where not given).
        policy: a policy, mapping or YAML path the other arguments override.
        monitor, save_best_only, verbose: ModelCheckpoint's arguments, `Default` where not given.
        mode: the mode, an unknown one already turned into "auto".
        weights_only: `save_weights_only`.
        save_freq: "epoch", or an integer: `every_n_steps` in policy mode.
        export_best: a SavedModel export of the best model is asked for.
    """
    fields = dict(fields)
    if not isinstance(save_freq, str):
        # ModelCheckpoint let only ints through; in policy mode they count optimizer steps.
        if isinstance(save_freq, bool) or save_freq < 1:
            raise PolicyError(
                f"save_freq must be 'epoch' or a positive number of batches. Received: save_freq={save_freq!r}"
            )
        every_n_steps = fields.get("every_n_steps")
        if every_n_steps is not None and every_n_steps != save_freq:
            raise PolicyError(
                "save_freq=N and every_n_steps=N ask for the same thing (a training state every N steps); "
                f"give one of them. Received: save_freq={save_freq!r}, every_n_steps={every_n_steps!r}"
            )
        fields["every_n_steps"] = save_freq
    overrides = {k: v for k, v in fields.items() if v is not None}
    base = load_policy(policy) if policy is not None else None
    if base is None or given(monitor):
        overrides["monitor"] = plain(monitor)
    if base is None or given(mode):
        overrides["mode"] = plain(mode)
    if given(save_best_only):
        overrides["save_best_only"] = bool(save_best_only)
    if given(verbose):
        overrides["verbose"] = bool(verbose)
    implied_ext: str | None = None
    if filepath is not None:
        for name in ("dirpath", "filename"):
            if fields.get(name) is not None:
                raise PolicyError(
                    f"give either filepath or {name}, not both: filepath names the directory and the file. "
                    f"Received: filepath={os.fspath(filepath)!r}, {name}={fields[name]!r}"
                )
        head, tail = os.path.split(str(os.fspath(filepath)))
        stem, implied_ext = split_extension(tail)
        overrides["dirpath"] = head or "."
        overrides["filename"] = stem
    result = load_policy(base, **overrides)
    if result.filename is not None and implied_ext is None:
        stem, implied_ext = split_extension(result.filename)
        if implied_ext is not None:
            result = load_policy(result, filename=stem)
    result = settle_format(result, implied_ext, weights_only)
    if result.filename is not None and any(name == "batch" for name, _spec in template_fields(result.filename)):
        raise PolicyError(
            "the {batch} placeholder has no value in policy mode: its checkpoints are named at epoch ends "
            "(mid-epoch saves are named last-epoch=E-step=S); use {step}, or drop the policy fields. "
            f"Received: filename={result.filename!r}"
        )
    if export_best and is_url(result.dirpath):
        raise PolicyError(
            "export_best writes a SavedModel directory and needs a local dirpath; export from a local "
            f"directory and copy it. Received: dirpath={result.dirpath!r}"
        )
    return result, implied_ext == LEGACY_EXT


def settle_format(policy: CheckpointPolicy, ext: str | None, weights_only: bool) -> CheckpointPolicy:
    """The format the file extension, `save_weights_only` and `format` agree on."""
    fmt = policy.format
    named = f"a name ending in {ext!r}" if ext else "no extension"
    if weights_only:
        if fmt not in (None, "weights"):
            raise PolicyError(
                "save_weights_only=True saves .weights.h5 files, which contradicts the format; drop one of the "
                f"two. Received: save_weights_only=True, format={fmt!r}"
            )
        fmt = "weights"
    if ext == WEIGHTS_EXT and fmt not in (None, "weights"):
        raise PolicyError(
            f"a .weights.h5 file holds weights only; use format='weights' or a '.keras' name. "
            f"Received: {named}, format={fmt!r}"
        )
    if ext in (KERAS_EXT, LEGACY_EXT) and fmt == "weights":
        raise PolicyError(
            f"format='weights' writes .weights.h5 files; name the file '*.weights.h5' or drop format. "
            f"Received: {named}, format='weights'"
        )
    if ext == LEGACY_EXT and fmt == "training_state":
        raise PolicyError(
            "format='training_state' needs the native .keras format (legacy .h5 files do not restore the "
            f"optimizer); name the file '*.keras' or use format='model'. Received: {named}, format='training_state'"
        )
    if ext == WEIGHTS_EXT:
        fmt = "weights"
    elif ext == LEGACY_EXT:
        fmt = "model"
    if fmt != policy.format:
        policy = load_policy(policy, format=fmt)
    return policy


def resolve_mode(policy: CheckpointPolicy, model: Any) -> CheckpointPolicy:
    """`policy`, with mode='auto' settled by the compiled Keras metric's direction when the name does not tell.

    Compiled metrics are built by the first train step: call it at the first epoch end.
    """
    monitor = policy.monitor
    if monitor is None or policy.mode != "auto" or metric_direction(monitor) is not None:
        return policy
    name = monitor.removeprefix("val_")
    for metric in getattr(model, "metrics", ()) or ():
        for candidate in [metric, *(getattr(metric, "metrics", None) or ())]:
            direction = getattr(candidate, "_direction", None)
            if getattr(candidate, "name", None) == name and direction in ("up", "down"):
                return load_policy(policy, mode="max" if direction == "up" else "min")
    return policy
