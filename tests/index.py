"""Read a checkpoint directory's index in tests: the JSON a compacted manifest.json holds.

Goes through CheckpointDirectory, so it also sees commits still in the journal (a run that
was killed, or is still going)."""

from __future__ import annotations

import json
import os
from typing import Any

from checkpoint_hooks.core.directory import CheckpointDirectory


def read_index(dirpath: str | os.PathLike[str]) -> dict[str, Any]:
    manifest = CheckpointDirectory(os.fspath(dirpath)).read_manifest()
    assert manifest is not None, f"no manifest in {dirpath}"
    data: dict[str, Any] = json.loads(manifest.to_bytes())
    return data
