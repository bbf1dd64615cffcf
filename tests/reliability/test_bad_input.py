"""A table of bad policies and arguments: each gives one clear message naming the field, the value and the fix,
and none surfaces a traceback from inside pydantic, yaml or a framework."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from checkpoint_hooks import CheckpointPolicy, PolicyError, load_policy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (YAML text, fragments the message must contain)
YAML_CASES = [
    ("monitor: [val_loss\n", [":2: not valid YAML", "fix the syntax"]),
    ("monitor: val_loss\n\ttop_k: 3\n", [":2: not valid YAML"]),
    ("monitor: val_loss\ntopk: 3\n", [":2: unknown field 'topk'", "did you mean 'top_k'?"]),
    ("snapshots:\n  every: 3\n", [":2: unknown field 'every'", "known fields: every_n_epochs, keep"]),
    ("snapshots:\n  every_n_epoch: 3\n", [":2: unknown field 'every_n_epoch'", "did you mean 'every_n_epochs'?"]),
    ("monitor: val_loss\ntop_k: -3\n", [":2:", "top_k must be -1", "Received: top_k=-3"]),
    ("monitor: val_loss\ntop_k: three\n", [":2: top_k", "whole number", "Received: top_k='three'"]),
    ("monitor: val_loss\ntop_k: 2.5\n", [":2: top_k", "whole number", "Received: top_k=2.5"]),
    ("min_delta: -0.1\n", [":1: min_delta", "use a value >= 0", "Received: min_delta=-0.1"]),
    ("mode: maximize\n", [":1: mode", "use one of 'min', 'max' or 'auto'", "Received: mode='maximize'"]),
    ("format: onnx\n", [":1: format", "'weights', 'model', 'training_state' or 'sharded'", "Received: format='onnx'"]),
    ("save_best_only: maybe\nmonitor: val_loss\n", [":1: save_best_only", "use true or false", "Received: save_best_only='maybe'"]),
    ("snapshots: 5\n", [":1: snapshots", "use a mapping", "Received: snapshots=5"]),
    ("snapshots:\n  every_n_epochs: 0\n", [":2: snapshots.every_n_epochs", "use a value >= 1", "Received: snapshots.every_n_epochs=0"]),
    ("snapshots:\n  keep: -1\n", [":2: snapshots.keep", "use a value >= 1"]),
    ("on_save_error: ignore\n", [":1: on_save_error", "'raise' or 'warn'", "Received: on_save_error='ignore'"]),
    ("- monitor\n- val_loss\n", [":1: a policy must be a mapping", "Received: list"]),
    ("top_k: 3\n", ["top_k=3 needs a monitor", "set monitor='val_loss'"]),
    ("save_best_only: true\n", ["save_best_only=True needs a monitor"]),
    ("monitor: val_acc\nmode: min\n", ["mode='min' contradicts monitor='val_acc'", "set mode='max' or mode='auto'"]),
    ("filename: runs/{epoch}\n", [":1: filename", "put directories in dirpath", "Received: filename='runs/{epoch}'"]),
    ("filename: 'e{epoch:.2q}'\n", [":1: filename", "format spec ':.2q'", "Received: filename='e{epoch:.2q}'"]),
    ("filename: 'e{}'\n", [":1: filename", "has no name", "write e.g. '{epoch}'"]),
    ("filename: 'e{epoch'\n", [":1: filename", "not valid", "Received: filename='e{epoch'"]),
    ("filename: '{epoch!r}'\n", [":1: filename", "conversions such as '!r' are not supported"]),
    ("dirpath: ''\n", [":1: dirpath", "dirpath must name a directory"]),
    ("resume: ''\n", [":1: resume", "resume must be 'auto', 'never' or a checkpoint path"]),
    ("monitor: val_loss\nsave_best_only: true\ntop_k: 0\n", ["save_best_only=True with top_k=0", "set top_k >= 1 or -1"]),
    ("verify: yes please\n", [":1: verify", "use true or false"]),
    ("monitor: ''\n", [":1: monitor", "monitor must be a logged metric name"]),
    ("last: []\n", [":1: last", "use true or false", "Received: last=[]"]),
]


def assert_clean(exc: BaseException) -> None:
    message = str(exc)
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    for leak in ("errors.pydantic.dev", "pydantic_core", "yaml.scanner", "Traceback", "For further information"):
        assert leak not in message


@pytest.mark.parametrize("text, fragments", YAML_CASES, ids=[f"yaml{i}" for i in range(len(YAML_CASES))])
def test_bad_yaml_policy(tmp_path, text, fragments):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        CheckpointPolicy.from_yaml(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message
    assert_clean(info.value)


def test_load_policy_of_a_wrong_type():
    with pytest.raises(PolicyError, match="policy must be a CheckpointPolicy, a dict or a YAML file path. Received: int") as info:
        load_policy(42)  # type: ignore[arg-type]
    assert_clean(info.value)


def test_cli_reports_a_bad_policy_without_a_traceback(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("monitor: val_loss\ntop_k: -5\n")
    proc = subprocess.run([sys.executable, "-m", "checkpoint_hooks.cli", "policy", "check", str(path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {path}:2: top_k must be -1 (keep all), 0 (keep none) or a positive count. Received: top_k=-5"
    )


# -- arguments and runtime input in a real Lightning fit ------------------------------------

lightning = pytest.importorskip("lightning.pytorch")


def lightning_fit(tmp_path, **kwargs):
    from checkpoint_hooks.lightning import BestCheckpoint
    from tests.lightning.models import loader, make_module, trainer

    kwargs.setdefault("dirpath", tmp_path / "ckpt")
    t = trainer(lightning, [BestCheckpoint(**kwargs)], 1)
    t.fit(make_module(lightning), loader(), loader())


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"monitor": "val_loss", "topk": 3}, PolicyError, ["unknown field 'topk'; did you mean 'top_k'?"]),
        ({"monitor": "val_loss", "every_n_train_steps": -1}, PolicyError, ["every_n_train_steps=-1", "Must be >= 0"]),
        ({"monitor": "val_loss", "save_top_k": 2, "top_k": 2}, PolicyError, ["give save_top_k or top_k, not both"]),
        ({"monitor": "val_loss", "save_top_k": -2}, PolicyError, ["Received: top_k=-2"]),
        ({"monitor": "val_loss", "mode": "biggest"}, PolicyError, ["Received: mode='biggest'"]),
    ],
)
def test_bad_lightning_arguments(tmp_path, kwargs, error, fragments):
    from checkpoint_hooks.lightning import BestCheckpoint

    with pytest.raises(error) as info:
        BestCheckpoint(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_clean(info.value)


def test_monitor_missing_from_the_logs(tmp_path):
    from checkpoint_hooks.core.errors import MonitorError

    with pytest.raises(MonitorError) as info:
        lightning_fit(tmp_path, monitor="val_f1")
    assert "monitor='val_f1' is not among the logged metrics (train_loss, val_loss)" in str(info.value)


def test_filename_with_a_placeholder_never_logged(tmp_path):
    # with a policy field the policy's rule holds (ModelCheckpoint's arguments alone fill in 0, as it does)
    with pytest.raises(PolicyError) as info:
        lightning_fit(tmp_path, monitor="val_loss", top_k=1, filename="{epoch}-{val_f1:.2f}")
    assert "filename placeholder '{val_f1}' is not a logged value; available: epoch, step, train_loss, val_loss" in str(info.value)


def test_dirpath_that_is_a_file(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(PolicyError) as info:
        lightning_fit(tmp_path, monitor="val_loss", dirpath=target)
    assert f"dirpath {str(target)!r} is a file, not a directory" in str(info.value)
    assert f"Received: dirpath={str(target)!r}" in str(info.value)


def test_resume_path_that_does_not_exist(tmp_path):
    with pytest.raises(PolicyError) as info:
        lightning_fit(tmp_path, monitor="val_loss", resume="nope.ckpt")
    assert "'nope.ckpt' does not exist. Received: resume='nope.ckpt'" in str(info.value)
