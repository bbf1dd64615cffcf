"""What `BestCheckpoint` shows of itself: ModelCheckpoint's base classes, its arguments, and the policy's.

LightningCLI (jsonargparse) and `inspect.signature` read the real signature: the policy fields
are listed there one by one, with their types, rather than hidden in `**policy_fields`, so a
config's `init_args: {top_k: 3, snapshots: {every_n_epochs: 5}}` is accepted and `--help` shows them.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from checkpoint_hooks.policy import CheckpointPolicy, SnapshotPolicy


def model_checkpoint_bases() -> tuple[type, ...]:
    """The `ModelCheckpoint` of every Lightning namespace installed (`lightning.pytorch`, `pytorch_lightning`)."""
    bases = []
    for module in ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks"):
        try:
            bases.append(__import__(module, fromlist=["ModelCheckpoint"]).ModelCheckpoint)
        except ImportError:
            continue
    if not bases:
        raise ImportError("checkpoint_hooks.lightning needs PyTorch Lightning: pip install 'checkpoint-hooks[lightning]'")
    return tuple(bases)


def lightning_filename(template: str) -> str:
    """Lightning's `auto_insert_metric_name`: '{epoch}-{val_loss:.2f}' -> 'epoch={epoch}-val_loss={val_loss:.2f}'."""

    def insert(match: re.Match[str]) -> str:
        start = match.start()
        name = match.group(1)
        if template[max(0, start - len(name) - 1) : start] == name + "=":
            return match.group(0)
        return f"{name}={match.group(0)}"

    return re.sub(r"\{([^{}:!]+)(?:[:!][^{}]*)?\}", insert, template)


def placeholders(template: str) -> list[str]:
    """The names a filename template asks for, as Lightning finds them ('{val/loss:.2f}' -> 'val/loss')."""
    return [group[1:] for group in re.findall(r"(\{.*?)[:\}]", template)]


# ModelCheckpoint's spellings with a policy field of the same name: the policy's type is not shown for them.
_SHARED = frozenset({"dirpath", "filename", "monitor", "verbose", "mode"})


def _policy_annotation(name: str, annotation: Any) -> Any:
    """The type a configuration may give for a policy field; None means "the policy's default"."""
    if name == "snapshots":
        return SnapshotPolicy | dict[str, Any] | None
    return annotation | None


def policy_parameters(taken: set[str]) -> list[inspect.Parameter]:
    """One keyword-only parameter for each policy field that ModelCheckpoint's arguments do not spell."""
    params = [
        inspect.Parameter(
            "policy",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=CheckpointPolicy | Mapping[str, Any] | str | os.PathLike[str] | None,
        )
    ]
    for name, field in CheckpointPolicy.model_fields.items():
        if name in taken or name in _SHARED:
            continue
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_policy_annotation(name, field.annotation))
        )
    return params


def _shown(annotation: Any, default: Any) -> Any:
    """ModelCheckpoint's type, with None allowed where None stands for "not given" (the policy decides)."""
    return annotation | None if default is None else annotation


def explicit_signature(init: Callable[..., None], lightning_init: Callable[..., None]) -> inspect.Signature:
    """`init`'s signature with ModelCheckpoint's annotations (real types, not strings) and every policy field.

    Args:
        init: BestCheckpoint.__init__, whose parameters and defaults are kept.
        lightning_init: ModelCheckpoint.__init__, whose annotations are used for the arguments it shares.
    """
    theirs = inspect.signature(lightning_init).parameters
    ours = [
        p.replace(annotation=_shown(theirs[p.name].annotation, p.default)) if p.name in theirs else p
        for p in inspect.signature(init).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name != "policy"
    ]
    return inspect.Signature(ours + policy_parameters({p.name for p in ours}))
