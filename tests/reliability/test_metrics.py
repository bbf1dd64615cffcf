"""NaN, infinities and missing monitor values never corrupt the ranking or the manifest."""

from __future__ import annotations

import json
import math

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine

NAN, INF = float("nan"), float("inf")


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_manifest_stays_strict_json_and_ranking_sane(tmp_path):
    engine = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", top_k=2),
                    extensions={"training_state": ".bin"})
    engine.start()
    values = [NAN, INF, 0.5, None, -INF, NAN, 0.4]
    for epoch, value in enumerate(values):
        metrics = {} if value is None else {"val_loss": value, "other": NAN}
        engine.save(epoch, epoch, metrics, lambda item, path: open(path, "wb").write(b"x"))
        # the index (base and journal lines) parses as strict JSON at every step
        strict_json((tmp_path / "manifest.json").read_text())
        for line in (tmp_path / "manifest.journal").read_text().splitlines():
            strict_json(line.partition(" ")[2])
    engine.directory.commit(engine.manifest)  # a rewritten base holds the same numbers
    data = strict_json((tmp_path / "manifest.json").read_text())
    ranked = [(r.epoch, r.metrics["val_loss"]) for r in engine.top_k_records()]
    assert ranked == [(4, -INF), (6, 0.4)]
    kept = {r["epoch"]: r for r in data["records"]}
    assert kept[4]["metrics"]["val_loss"] == "-Infinity" and kept[6]["metrics"]["other"] == "NaN"
    assert engine.best_record.epoch == 4
    state = engine.state_dict()
    assert state["best_model_score"] == -INF
    engine.close()
    # a resumed engine reads the same numbers back
    again = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", top_k=2),
                   extensions={"training_state": ".bin"})
    again.start()
    assert [(r.epoch, r.metrics["val_loss"]) for r in again.top_k_records()] == ranked
    assert math.isnan(again.manifest.by_name(again.best_record.name).metrics["other"])
    again.close()


def test_all_nan_run_keeps_no_best_score_but_keeps_checkpoints(tmp_path):
    engine = Engine(CheckpointPolicy(dirpath=str(tmp_path), monitor="val_loss", top_k=1),
                    extensions={"training_state": ".bin"})
    engine.start()
    for epoch in range(3):
        engine.save(epoch, epoch, {"val_loss": NAN}, lambda item, path: open(path, "wb").write(b"x"))
    assert engine.state_dict()["best_model_score"] is None
    assert engine.best_model_score is None  # what every adapter shows as its best score
    assert engine.best_model_path == str(tmp_path / "epoch=000-val_loss=nan.bin")
    assert engine.last_model_path == engine.path_of(engine.last_record)
    assert [r.epoch for r in engine.top_k_records()] == [0]  # the first NaN fills the slot; NaN never improves
    assert engine.last_record.epoch == 2
    engine.close()
