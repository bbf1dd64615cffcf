"""`export_best`: the best model as a TensorFlow SavedModel in `<dirpath>/best_export/`, for serving.

The export is written into a staging folder and renamed into place, so a reader sees
the previous export or the new one, never half of one; `keras.layers.TFSMLayer` and
`tf.saved_model.load` read it. `checkpoint_hooks.json` inside it names the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any

from checkpoint_hooks.core.engine import Engine
from checkpoint_hooks.core.errors import SaveError
from checkpoint_hooks.core.records import Record
from checkpoint_hooks.core.store import STAGING_PREFIX

log = logging.getLogger("checkpoint_hooks")

EXPORT_DIRNAME = "best_export"
EXPORT_INFO = "checkpoint_hooks.json"


def export_best(model: Any, engine: Engine, record: Record) -> str | None:
    """Export `model`, saved as `record`, next to the checkpoints; the export's path (None when it failed and
    `on_save_error='warn'` let training go on).

    Raises:
        SaveError: the export failed (the previous export, if any, stays in place).
    """
    assert engine.store is not None
    root = engine.store.join("")
    target = os.path.join(root, EXPORT_DIRNAME)
    token = uuid.uuid4().hex[:12]
    # The staging prefix lets the engine's start-up cleanup remove what an interrupted export left.
    staged = os.path.join(root, f"{STAGING_PREFIX}export-{token}")
    retired = os.path.join(root, f"{STAGING_PREFIX}retired-export-{token}")
    try:
        model.export(staged, format="tf_saved_model", verbose=False)
        info = {
            "record": record.name,
            "checkpoint": record.primary_path,
            "epoch": record.epoch + engine.epoch_base,
            "step": record.step,
            "metrics": dict(record.metrics),
        }
        with open(os.path.join(staged, EXPORT_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if os.path.exists(target):
            os.replace(target, retired)
        os.replace(staged, target)
    except Exception as exc:
        shutil.rmtree(staged, ignore_errors=True)
        if os.path.exists(retired) and not os.path.exists(target):
            os.replace(retired, target)
        message = f"could not export the best model ({record.name}) to {target}: {type(exc).__name__}: {exc}"
        if engine.policy.on_save_error == "warn":
            log.warning("%s; training goes on (on_save_error='warn')", message)
            return None
        raise SaveError(message) from exc
    shutil.rmtree(retired, ignore_errors=True)
    log.log(engine.level, "exported the best model (%s) to %s", record.name, target)
    return target
