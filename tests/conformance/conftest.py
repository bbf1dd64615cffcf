"""The conformance suite's marker: which driver runs a test reads, so only those are started."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance_runs(*names): the driver runs (harness specs) a test reads")
