"""CheckpointPolicy: defaults, YAML round trip, and errors that name the field, the value and the fix."""

from __future__ import annotations

import json

import pytest

from checkpoint_hooks import CheckpointPolicy, PolicyError, load_policy
from checkpoint_hooks.policy import metric_direction


def test_defaults_are_lightning_like():
    p = CheckpointPolicy()
    assert (p.top_k, p.last, p.resume, p.save_best_only, p.format) == (1, True, "auto", False, None)
    assert p.filename_template == "epoch={epoch:03d}-step={step}"
    assert CheckpointPolicy(monitor="val_loss").filename_template == "epoch={epoch:03d}-val_loss={val_loss:.4f}"


@pytest.mark.parametrize(
    "name, mode",
    [("val_acc", "max"), ("val_accuracy", "max"), ("valAcc", "max"), ("val/f1", "max"), ("auc", "max"),
     ("val_map", "max"), ("score", "max"), ("val_loss", "min"), ("val_mape", "min"), ("mse", "min"),
     ("throughput", "min")],
)
def test_auto_mode(name, mode):
    assert CheckpointPolicy(monitor=name).resolved_mode == mode


def test_metric_direction_ambiguous_names():
    assert metric_direction("acc_loss") is None
    assert metric_direction("epoch_time") is None


def test_yaml_round_trip_is_lossless(tmp_path):
    p = CheckpointPolicy(dirpath="s3://bucket/run", monitor="val_acc", mode="max", min_delta=0.01, top_k=3,
                         format="weights", filename="e{epoch}-{val_acc:.3f}", snapshots={"every_n_epochs": 5, "keep": 2},
                         last=False, resume="never", async_save=True, verify=False, on_save_error="warn")
    path = tmp_path / "policy.yaml"
    path.write_text(p.to_yaml())
    assert CheckpointPolicy.from_yaml(path) == p
    assert load_policy(path) == p
    assert load_policy(p.to_dict()) == p
    assert load_policy(path, top_k=5).top_k == 5


def test_schema_is_json():
    schema = CheckpointPolicy.model_json_schema()
    json.dumps(schema)
    assert "top_k" in schema["properties"]
    assert all(field.description for field in CheckpointPolicy.model_fields.values())


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"topk": 3}, "unknown field 'topk'; did you mean 'top_k'?"),
        ({"snapshots": {"every_n_epoch": 2}}, "did you mean 'every_n_epochs'"),
        ({"top_k": -3}, "Received: top_k=-3"),
        ({"top_k": "three"}, "Received: top_k='three'"),
        ({"min_delta": -1}, "min_delta"),
        ({"mode": "maximum"}, "use one of 'min', 'max' or 'auto'"),
        ({"format": "onnx"}, "Received: format='onnx'"),
        ({"top_k": 3}, "needs a monitor"),
        ({"save_best_only": True}, "save_best_only=True needs a monitor"),
        ({"monitor": "val_loss", "save_best_only": True, "top_k": 0}, "top_k=0"),
        ({"monitor": "val_acc", "mode": "min"}, "contradicts monitor='val_acc'"),
        ({"filename": "ckpt/{epoch}"}, "put directories in dirpath"),
        ({"filename": "{epoch:.3q}"}, "format spec"),
        ({"filename": "{}"}, "has no name"),
        ({"filename": "{epoch"}, "not valid"),
        ({"dirpath": " "}, "dirpath must name a directory"),
        ({"snapshots": {"every_n_epochs": 0}}, "snapshots.every_n_epochs"),
        ({"on_save_error": "ignore"}, "on_save_error"),
        ({"resume": ""}, "resume must be"),
    ],
)
def test_bad_keyword_arguments(kwargs, expected):
    with pytest.raises(PolicyError) as info:
        CheckpointPolicy(**kwargs)
    assert expected in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(
    "text, expected",
    [
        ("monitor: val_loss\ntopk: 3\n", "policy.yaml:2: unknown field 'topk'; did you mean 'top_k'?"),
        ("monitor: val_loss\nsnapshots:\n  every_n_epochs: -1\n", "policy.yaml:3: snapshots.every_n_epochs"),
        ("monitor: [val_loss\n", "policy.yaml:2: not valid YAML"),
        ("- a\n- b\n", "a policy must be a mapping"),
        ("top_k: 3\n", "needs a monitor"),
    ],
)
def test_bad_yaml_names_file_and_line(tmp_path, text, expected):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        CheckpointPolicy.from_yaml(path)
    assert expected in str(info.value).replace(str(tmp_path) + "/", "")


def test_missing_yaml_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        CheckpointPolicy.from_yaml(tmp_path / "nope.yaml")


def test_empty_yaml_is_the_default_policy(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("")
    assert CheckpointPolicy.from_yaml(path) == CheckpointPolicy()


def test_load_policy_rejects_other_types():
    with pytest.raises(PolicyError, match="Received: int"):
        load_policy(3)  # type: ignore[arg-type]


def test_assignment_is_validated():
    p = CheckpointPolicy(monitor="val_loss")
    with pytest.raises(Exception):
        p.top_k = -7
