"""Checkpoint names from the policy's filename template."""

from __future__ import annotations

import string
from collections.abc import Container, Mapping
from typing import Any

from checkpoint_hooks.core.lock import LOCK_NAME
from checkpoint_hooks.core.manifest import HEAD_NAME, JOURNAL_NAME, MANIFEST_NAME, SIDECAR_SUFFIX
from checkpoint_hooks.core.store import STAGING_PREFIX
from checkpoint_hooks.policy import PolicyError, short_repr

MAX_LISTED = 20  # logged names an error message lists
_INDEX_STEM = MANIFEST_NAME.split(".")[0]  # "manifest": with the ".json" a format may add, the index's name
_SIDECAR_STEM = SIDECAR_SUFFIX.removesuffix(".json")  # ".meta": with a ".json" extension, another name's sidecar


def reserved_reason(name: str) -> str | None:
    """Why `name` cannot name a checkpoint in a checkpoint directory, or None when it can.

    The directory holds files of its own next to the checkpoints: staging folders and temporary
    files ('.staging-*', removed as leftovers after a crash), the lock ('.checkpoint_hooks.lock'),
    the index (manifest.json, manifest.journal, manifest.head) and a sidecar per checkpoint
    ('<name>.meta.json'). A checkpoint named like one of them, or whose file name plus a format's
    extension (".json", or none for folders) is one of them, could be deleted or overwritten. Case is
    ignored: macOS and Windows disks are case-insensitive.
    """
    if "\x00" in name:
        return "contains a NUL character, which no file system accepts"
    lowered = name.lower()
    if lowered.startswith(STAGING_PREFIX):
        return f"starts with {STAGING_PREFIX!r}, the prefix of unfinished saves (removed after a crash)"
    if lowered.startswith(LOCK_NAME.rsplit(".", 1)[0]):
        return f"is named like the directory's lock file {LOCK_NAME!r}"
    if lowered.startswith("."):
        return "starts with '.', which the directory keeps for its internal files (staging folders, the lock)"
    if lowered.split(".")[0] == _INDEX_STEM:
        return f"is named like the directory's index ({MANIFEST_NAME}, {JOURNAL_NAME}, {HEAD_NAME})"
    if lowered.endswith((_SIDECAR_STEM, SIDECAR_SUFFIX)):
        return f"ends like the sidecar files ('<name>{SIDECAR_SUFFIX}') that describe each checkpoint"
    return None


def render_name(template: str, values: Mapping[str, Any]) -> str:
    """Fill `template` from `values` (epoch, step, metrics); a '/' in a metric name becomes '_'."""
    parts = []
    for literal, name, spec, _conversion in string.Formatter().parse(template):
        parts.append(literal)
        if name is None:
            continue
        if name not in values:
            names = sorted(values)
            available = ", ".join(names[:MAX_LISTED]) or "none"
            if len(names) > MAX_LISTED:
                available += f" and {len(names) - MAX_LISTED} more"
            raise PolicyError(
                f"filename placeholder '{{{name}}}' is not a logged value; available: {available}. "
                f"Received: filename={short_repr(template)}"
            )
        parts.append(format(values[name], spec or ""))
    return "".join(parts).replace("/", "_").replace("\\", "_")


def format_name(template: str, values: Mapping[str, Any]) -> str:
    """The checkpoint name `template` makes from `values`, refused when the directory reserves it.

    The policy checks templates with sample values; this checks the real name, since a logged
    value can make a name the samples did not.
    """
    name = render_name(template, values)
    reason = reserved_reason(name)
    if reason is not None:
        raise PolicyError(
            f"filename makes the checkpoint name {short_repr(name)}, which {reason}; change the filename "
            f"template. Received: filename={short_repr(template)}"
        )
    return name


def unique_name(base: str, taken: Container[str]) -> str:
    """`base`, or `base-v1`, `base-v2`, ... when taken (Lightning's convention)."""
    if base not in taken:
        return base
    version = 1
    while f"{base}-v{version}" in taken:
        version += 1
    return f"{base}-v{version}"
