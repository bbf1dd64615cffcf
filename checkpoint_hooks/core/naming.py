"""Checkpoint names from the policy's filename template."""

from __future__ import annotations

import string
from collections.abc import Container, Mapping
from typing import Any

from checkpoint_hooks.policy import PolicyError


def format_name(template: str, values: Mapping[str, Any]) -> str:
    """Fill `template` from `values` (epoch, step, metrics); a '/' in a metric name becomes '_'."""
    parts = []
    for literal, name, spec, _conversion in string.Formatter().parse(template):
        parts.append(literal)
        if name is None:
            continue
        if name not in values:
            available = ", ".join(sorted(values)) or "none"
            raise PolicyError(
                f"filename placeholder '{{{name}}}' is not a logged value; available: {available}. "
                f"Received: filename={template!r}"
            )
        parts.append(format(values[name], spec or ""))
    return "".join(parts).replace("/", "_").replace("\\", "_")


def unique_name(base: str, taken: Container[str]) -> str:
    """`base`, or `base-v1`, `base-v2`, ... when taken (Lightning's convention)."""
    if base not in taken:
        return base
    version = 1
    while f"{base}-v{version}" in taken:
        version += 1
    return f"{base}-v{version}"

