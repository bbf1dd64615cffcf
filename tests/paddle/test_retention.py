"""Retention through real Paddle fits: top-k, snapshots, the rolling last, metric names, YAML."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from checkpoint_hooks.paddle import BestCheckpoint
from checkpoint_hooks.policy import PolicyError
from tests.paddle.toy import (
    STEPS_PER_EPOCH,
    VAL_OFFSETS,
    Recorder,
    Regression,
    listing,
    manifest_records,
    regression_model,
)

BATCH = 8


def fit(callback: BestCheckpoint, epochs: int = 6, seed: int = 0, **kwargs) -> Recorder:
    model = regression_model(seed)
    eval_data = Regression(16, seed=1, offsets=VAL_OFFSETS)
    recorder = Recorder(eval_data)
    model.fit(Regression(), eval_data, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[callback, recorder], **kwargs)
    recorder.model_ = model  # type: ignore[attr-defined]
    return recorder


def files(*names_and_exts: tuple[str, tuple[str, ...]]) -> list[str]:
    out = [".checkpoint_hooks.lock", "manifest.head", "manifest.json"]
    for name, exts in names_and_exts:
        out += [name + ".meta.json"] + [name + ext for ext in exts]
    return sorted(out)


WEIGHTS = (".pdparams",)
STATE = (".pdparams", ".pdopt")


def test_top_k_snapshots_and_last_keep_exactly_the_expected_files(tmp_path):
    callback = BestCheckpoint(
        monitor="val_loss", dirpath=str(tmp_path), top_k=2, format="weights", filename="epoch={epoch:03d}",
        snapshots={"every_n_epochs": 3, "keep": 1},
    )
    fit(callback, save_dir=str(tmp_path / "hapi"))

    # val_loss ranks the epochs 3 < 1 < 5 < 0 < 2 < 4; snapshots fall after epochs 2 and 5, keep=1
    # leaves the newest; the last is a separate training_state because the format is weights.
    last = f"last-epoch=005-step={6 * STEPS_PER_EPOCH}"
    assert listing(str(tmp_path)) == files(
        ("epoch=001", WEIGHTS), ("epoch=003", WEIGHTS), ("epoch=005", WEIGHTS), (last, STATE)
    )
    tags = {r["name"]: r["tags"] for r in manifest_records(str(tmp_path))}
    assert tags == {"epoch=001": ["best"], "epoch=003": ["best"], "epoch=005": ["snapshot"], last: ["last"]}
    assert callback.best_model_path == str(tmp_path / "epoch=003.pdparams")
    assert callback.last_model_path == str(tmp_path / f"{last}.pdparams")
    # BestCheckpoint is hapi's ModelCheckpoint for this fit: fit(save_dir=...) wrote nothing.
    assert not (tmp_path / "hapi").exists()


def test_val_loss_is_the_evaluation_loss_and_loss_the_training_loss(tmp_path):
    by_val = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path / "val"), top_k=2, last=False,
                            format="weights", filename="epoch={epoch}")
    recorder = fit(by_val)
    by_train = BestCheckpoint(monitor="loss", dirpath=str(tmp_path / "train"), top_k=2, last=False,
                              format="weights", filename="epoch={epoch}")
    train_recorder = fit(by_train)

    assert recorder.loss == train_recorder.loss
    best_train = sorted(recorder.loss, key=recorder.loss.get)[:2]
    assert sorted(best_train) != [1, 3]  # the two rankings differ, so the files tell them apart
    assert listing(str(tmp_path / "val")) == files(("epoch=1", WEIGHTS), ("epoch=3", WEIGHTS))
    assert listing(str(tmp_path / "train")) == files(*[(f"epoch={e}", WEIGHTS) for e in sorted(best_train)])

    record = by_val.engine.manifest.by_name("epoch=3")
    assert set(record.metrics) == {"loss", "val_loss"}
    assert record.metrics["loss"] == pytest.approx(recorder.loss[3], rel=1e-9)
    assert record.metrics["val_loss"] == pytest.approx(recorder.val_loss[3], rel=1e-9)
    assert record.metrics["val_loss"] > 20.0  # the offset 5 at epoch 3 makes it about 25
    assert record.metrics["loss"] < 1.0

    # val_loss is the mean over all evaluation batches, not hapi's last-batch value.
    model = recorder.model_
    data = Regression(16, seed=1, offsets=VAL_OFFSETS)
    data.epoch = 5
    target = data.y + np.float32(VAL_OFFSETS[5])
    prediction = model.network(paddle.to_tensor(data.x)).numpy()
    assert recorder.val_loss[5] == pytest.approx(float(np.mean((prediction - target) ** 2)), rel=1e-5)


def test_save_best_only_from_yaml(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"dirpath: {tmp_path / 'ck'}\nmonitor: val_loss\nsave_best_only: true\ntop_k: -1\n"
        "format: weights\nfilename: 'e{epoch}'\nlast: false\n"
    )
    callback = BestCheckpoint.from_yaml(policy)
    fit(callback)
    # Improvements of val_loss happen at epochs 0, 1 and 3 only.
    assert listing(str(tmp_path / "ck")) == files(("e0", WEIGHTS), ("e1", WEIGHTS), ("e3", WEIGHTS))
    assert math.isclose(callback.best_model_score, callback.engine.manifest.by_name("e3").metrics["val_loss"])


def test_yaml_errors_name_file_line_and_fix(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("monitor: val_loss\ntopk: 3\n")
    with pytest.raises(PolicyError, match=r"policy.yaml:2: unknown field 'topk'; did you mean 'top_k'\?"):
        BestCheckpoint.from_yaml(policy)
    with pytest.raises(PolicyError, match=r"top_k must be -1 .* Received: top_k=-3"):
        BestCheckpoint(monitor="val_loss", top_k=-3)
    # Keyword arguments override the file.
    policy.write_text(f"dirpath: {tmp_path / 'ck'}\nmonitor: val_loss\nformat: weights\n")
    callback = BestCheckpoint.from_yaml(policy, top_k=3, last=False, filename="e{epoch}")
    fit(callback, epochs=4)
    assert listing(str(tmp_path / "ck")) == files(("e0", WEIGHTS), ("e1", WEIGHTS), ("e3", WEIGHTS))
