"""Keras adapter tests: quiet TensorFlow, and the marker Keras's own ModelCheckpoint tests use."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # A marker of Keras's own ModelCheckpoint tests, which test_dropin runs with the class swapped.
    config.addinivalue_line("markers", "requires_trainable_backend: needs a backend that can train")
