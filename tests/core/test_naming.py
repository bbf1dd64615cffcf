from __future__ import annotations

import pytest

from checkpoint_hooks import PolicyError
from checkpoint_hooks.core.naming import format_name, unique_name


def test_format_name_with_specs_and_metric_names():
    assert format_name("epoch={epoch:03d}-{val_loss:.4f}", {"epoch": 7, "val_loss": 0.23101}) == "epoch=007-0.2310"
    assert format_name("{val/acc:.2f}", {"val/acc": 0.5}) == "0.50"
    assert format_name("e{epoch}-{m.x}", {"epoch": 1, "m.x": 2.0}) == "e1-2.0"
    assert format_name("{loss}", {"loss": float("nan")}) == "nan"


def test_format_name_unknown_placeholder_lists_available():
    with pytest.raises(PolicyError, match=r"'\{val_acc\}' is not a logged value; available: epoch, step, val_loss"):
        format_name("{val_acc}", {"epoch": 1, "step": 2, "val_loss": 1.0})


def test_unique_name():
    assert unique_name("a", set()) == "a"
    assert unique_name("a", {"a", "a-v1"}) == "a-v2"
