"""BestCheckpoint's arguments: `paddle.callbacks.ModelCheckpoint(save_freq, save_dir)` mapped onto the shared policy,
and the checkpoint names `paddle.Model.load(prefix)` can read.

`save_dir` is `dirpath`; `save_freq=N` is a periodic snapshot every N epochs
(`snapshots.every_n_epochs`, epochs N, 2N, ... counted from 1), outside the top-k
rotation. Left out, neither is set: no snapshots, and the directory comes from `dirpath`,
the policy, or else `fit(save_dir=...)`.

hapi's `Model.load(prefix)` takes what follows the last dot of the prefix for a file
extension (`os.path.splitext`) and refuses any but .pdparams/.pdopt/.pdmodel ("Unknown
postfix .1702"), so a Paddle checkpoint's name has no dot: in the default names a
number's decimal point is written as `_` (`epoch=011-val_loss=0_1702`), and a filename
template of the user's own that makes a dot is refused when the callback is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from checkpoint_hooks.core.engine import TRAINING_STATE
from checkpoint_hooks.core.manifest import Manifest
from checkpoint_hooks.core.naming import format_name, unique_name
from checkpoint_hooks.core.planner import Plan
from checkpoint_hooks.policy import CheckpointPolicy, PolicyError, load_policy, template_fields

# Formats `Model.load(prefix)` reads (a `model` checkpoint is a folder read with paddle.jit.load).
_LOADED_BY_PREFIX = frozenset({None, "weights", TRAINING_STATE})
_SAMPLE_VALUES = (0.5, 1234.5678, 1e-7)


def build_policy(
    save_freq: Any,
    save_dir: str | os.PathLike[str] | None,
    *,
    policy: CheckpointPolicy | Mapping[str, Any] | str | Path | None,
    dirpath: str | os.PathLike[str] | None,
    snapshots: int | Mapping[str, Any] | None,
    options: dict[str, Any],
) -> tuple[CheckpointPolicy, bool]:
    """The policy BestCheckpoint's arguments ask for, and whether it names its own directory.

    Args:
        save_freq, save_dir: ModelCheckpoint's arguments (None where not given).
        policy: a policy, mapping or YAML path the other arguments override.
        dirpath, snapshots: BestCheckpoint's own spellings of the same things.
        options: the other policy fields given as keywords.
    """
    options = dict(options)
    directory = _directory(save_dir, dirpath)
    if directory is not None:
        options["dirpath"] = directory
    base = load_policy(policy) if policy is not None else None
    wanted = _snapshots(save_freq, snapshots, base)
    if wanted is not None:
        options["snapshots"] = wanted
    result = load_policy(base, **options)
    check_filename(result)
    own_directory = directory is not None or (base is not None and "dirpath" in base.model_fields_set)
    return result, own_directory


def _directory(save_dir: str | os.PathLike[str] | None, dirpath: str | os.PathLike[str] | None) -> str | None:
    if save_dir is None:
        return os.fspath(dirpath) if dirpath is not None else None
    if dirpath is not None and os.fspath(dirpath) != os.fspath(save_dir):
        raise PolicyError(
            "save_dir (Paddle's name) and dirpath name the same directory; give one of them. "
            f"Received: save_dir={os.fspath(save_dir)!r}, dirpath={os.fspath(dirpath)!r}"
        )
    return os.fspath(save_dir)


def _snapshots(
    save_freq: Any, snapshots: int | Mapping[str, Any] | None, base: CheckpointPolicy | None
) -> dict[str, Any] | None:
    """The snapshots field `save_freq` and `snapshots` ask for together (None: leave the policy's)."""
    if save_freq is not None and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
        hint = f"; to rank by a metric pass monitor={save_freq!r}" if isinstance(save_freq, str) else ""
        raise PolicyError(
            "save_freq (the first argument, as in paddle.callbacks.ModelCheckpoint) must be a positive number of "
            f"epochs between snapshots{hint}. Received: save_freq={save_freq!r}"
        )
    if snapshots is None and save_freq is None:
        return None
    if snapshots is None or isinstance(snapshots, int):
        wanted: dict[str, Any] = base.snapshots.model_dump() if base is not None else {}
        if isinstance(snapshots, int):
            wanted = {"every_n_epochs": snapshots}
    else:
        wanted = dict(snapshots)
    every = wanted.get("every_n_epochs")
    if save_freq is not None:
        if snapshots is not None and every is not None and every != save_freq:
            raise PolicyError(
                "save_freq=N and snapshots ask for the same thing (a snapshot every N epochs); give one of them. "
                f"Received: save_freq={save_freq!r}, snapshots={snapshots!r}"
            )
        wanted["every_n_epochs"] = save_freq
    return wanted


def check_filename(policy: CheckpointPolicy) -> None:
    """Refuse a filename template of the user's own whose names have a dot, for the formats Model.load reads."""
    template = policy.filename
    if template is None or policy.format not in _LOADED_BY_PREFIX:
        return
    names = {name for name, _spec in template_fields(template)}
    for sample in _SAMPLE_VALUES:
        values: dict[str, Any] = {name: sample for name in names}
        values.update(epoch=1, step=1)
        example = format_name(template, values)
        if "." in example:
            raise PolicyError(
                f"filename={template!r} makes names with a dot (e.g. {example!r}), and paddle.Model.load(prefix) "
                "reads what follows a dot as a file extension ('Unknown postfix'); leave filename unset (numbers are "
                "then written as val_loss=0_1702) or write it without a dot, e.g. 'epoch={epoch:03d}-step={step}'"
            )


def without_dots(plan: Plan, manifest: Manifest) -> Plan:
    """`plan` with every '.' of its default names written as '_', each name still unique in the directory."""
    given: set[str] = set()

    class Taken:
        def __contains__(self, name: object) -> bool:
            return name in given or name in manifest

    items = []
    for item in plan.items:
        if "." in item.name:
            name = unique_name(item.name.replace(".", "_"), Taken())
            item = replace(item, name=name, filename=name + item.filename[len(item.name) :])
        given.add(item.name)
        items.append(item)
    return replace(plan, items=tuple(items))
