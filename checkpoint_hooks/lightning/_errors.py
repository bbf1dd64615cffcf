"""The error a bad ModelCheckpoint argument raises: Lightning's exception type and the policy's, one message."""

from __future__ import annotations

from checkpoint_hooks.policy import PolicyError


def _misconfiguration_exceptions() -> tuple[type[Exception], ...]:
    """`MisconfigurationException` of every Lightning namespace installed (each its own class)."""
    found: list[type[Exception]] = []
    for module in ("lightning.pytorch.utilities.exceptions", "pytorch_lightning.utilities.exceptions"):
        try:
            found.append(__import__(module, fromlist=["MisconfigurationException"]).MisconfigurationException)
        except ImportError:
            continue
    return tuple(found)


MISCONFIGURATION = _misconfiguration_exceptions()


class ArgumentError(PolicyError, *MISCONFIGURATION):  # type: ignore[misc]
    """A ModelCheckpoint argument ModelCheckpoint itself refuses: code catching either exception sees it."""


def argument_error(lightning: Exception, policy: PolicyError | None) -> ArgumentError:
    """One line: the policy's message (field, value, fix) where it has one, ModelCheckpoint's after it."""
    if policy is None:
        return ArgumentError(str(lightning))
    return ArgumentError(f"{policy} (ModelCheckpoint: {lightning})")
