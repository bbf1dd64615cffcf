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
    """Make `alias` name the file `target` (replacing what it named): a hard link, else a copy."""
    temporary = alias + ".linking"
    if os.path.lexists(temporary):
        os.remove(temporary)
    if symbolic:
        same_folder = os.path.dirname(os.path.abspath(target)) == os.path.dirname(os.path.abspath(alias))
        os.symlink(os.path.basename(target) if same_folder else target, temporary)
    else:
        try:
            os.link(target, temporary)
        except OSError:  # a file system without hard links
            shutil.copyfile(target, temporary)
    os.replace(temporary, alias)
    if os.path.lexists(temporary):  # rename does nothing when both already name the same file
        os.remove(temporary)
