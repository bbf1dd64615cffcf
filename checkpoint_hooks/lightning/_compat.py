"""ModelCheckpoint's conventions BestCheckpoint keeps: how it reads metrics, keeps scores and names `last.ckpt`."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import torch


def logged_metrics(trainer: Any) -> dict[str, Any]:
    """The logged values as numbers (tensors of one element), without the others."""
    values = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in trainer.callback_metrics.items()}
    return {k: v for k, v in values.items() if not isinstance(v, torch.Tensor) and v is not None}


def lightning_score(value: float, mode: str) -> torch.Tensor:
    """A monitored value as ModelCheckpoint keeps it: a tensor, NaN being the worst score there is."""
    if math.isnan(value):
        value = math.inf if mode == "min" else -math.inf
    return torch.tensor(value)


def link_file(target: str, alias: str, *, symbolic: bool) -> None:
    """Make `alias` name the file or folder `target` (replacing what it named): a hard link, else a copy.

    A folder (a sharded checkpoint) gets a folder of hard links to its files.
    """
    temporary = alias + ".linking"
    remove_path(temporary)
    if symbolic:
        same_folder = os.path.dirname(os.path.abspath(target)) == os.path.dirname(os.path.abspath(alias))
        os.symlink(os.path.basename(target) if same_folder else target, temporary)
    elif os.path.isdir(target):
        shutil.copytree(target, temporary, copy_function=_link_or_copy)
    else:
        _link_or_copy(target, temporary)
    if os.path.isdir(alias) and not os.path.islink(alias):  # a rename cannot replace a folder
        replaced = alias + ".replaced"
        remove_path(replaced)
        os.rename(alias, replaced)
        os.replace(temporary, alias)
        remove_path(replaced)
    else:
        os.replace(temporary, alias)
    if os.path.lexists(temporary):  # rename does nothing when both already name the same file
        os.remove(temporary)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, destination)


def remove_path(path: str) -> None:
    """Remove the file, link or folder at `path`, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
