"""Policy mode: top-k, snapshots, last, formats, YAML, thresholds, resume within a process, corrupt files."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import warnings
import zipfile
from typing import Any

import keras
import numpy as np
import pytest

from checkpoint_hooks import CheckpointPolicy, PolicyError
from checkpoint_hooks.keras import BestCheckpoint
from tests.index import read_index
from tests.keras.helpers import Script, Snapshot, data, listing, make_model, saved_state, weights_equal


def fit(model: keras.Model, callbacks: list[Any], epochs: int, **kwargs: Any) -> keras.callbacks.History:
    x, y = data()
    return model.fit(
        x,
        y,
        validation_data=(x[:8], y[:8]),
        batch_size=8,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
        **kwargs,
    )


def files_of(name: str, ext: str = ".keras") -> list[str]:
    """The files one record leaves: the checkpoint (a resumable one holds its RNG/epoch state) and the sidecar."""
    return [name + ext, name + ".meta.json"]


def directory(*records: list[str]) -> list[str]:
    """The sorted listing of a checkpoint directory that holds these records' files."""
    return sorted([*(name for files in records for name in files), "manifest.head", "manifest.json", ".checkpoint_hooks.lock"])


def manifest(dirpath: Any) -> dict[str, Any]:
    return read_index(dirpath)


def tags(dirpath: Any) -> dict[str, list[str]]:
    return {r["name"]: r["tags"] for r in manifest(dirpath)["records"]}


def test_top_k_snapshots_and_last_keep_exactly_the_right_files(tmp_path: Any) -> None:
    values = [0.5, 0.4, 0.6, 0.3, 0.45, 0.35]
    callback = BestCheckpoint(
        monitor="val_loss",
        dirpath=str(tmp_path),
        top_k=2,
        snapshots={"every_n_epochs": 2, "keep": 2},
        filename="e{epoch}-{val_loss:.2f}",
    )
    states = Snapshot()
    fit(make_model(), [Script(values), callback, states], epochs=6)
    assert listing(str(tmp_path)) == directory(files_of("e4-0.30"), files_of("e6-0.35"))
    assert tags(tmp_path) == {"e4-0.30": ["best", "snapshot"], "e6-0.35": ["best", "last", "snapshot"]}
    assert callback.best == 0.3
    assert callback.best_model_path == str(tmp_path / "e4-0.30.keras")
    assert callback.last_model_path == str(tmp_path / "e6-0.35.keras")
    best = keras.models.load_model(callback.best_model_path)
    assert weights_equal(best.get_weights(), states.weights[3])
    assert int(best.optimizer.iterations.numpy()) == 16  # 4 epochs x 4 batches: the optimizer state is in the file


def test_weights_format_keeps_a_separate_resumable_last(tmp_path: Any) -> None:
    callback = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), save_weights_only=True, filename="w{epoch}")
    states = Snapshot()
    model = make_model()
    fit(model, [Script([0.3, 0.5, 0.4]), callback, states], epochs=3)
    expected = directory(files_of("w1", ".weights.h5"), files_of("last-epoch=003-step=12"))
    assert listing(str(tmp_path)) == expected
    assert callback.policy is not None and callback.policy.format == "weights"
    fresh = make_model()
    fresh.load_weights(str(tmp_path / "w1.weights.h5"))
    assert weights_equal(fresh.get_weights(), states.weights[0])
    last = keras.models.load_model(str(tmp_path / "last-epoch=003-step=12.keras"))
    assert weights_equal(last.get_weights(), states.weights[2])


def test_legacy_h5_models_and_training_state(tmp_path: Any) -> None:
    legacy = BestCheckpoint(str(tmp_path / "h5" / "m{epoch}.h5"), monitor="val_loss", top_k=1)
    state = BestCheckpoint(
        monitor="val_loss", dirpath=str(tmp_path / "ts"), format="training_state", filename="s{epoch}"
    )
    states = Snapshot()
    fit(make_model(), [Script([0.3, 0.5, 0.4]), legacy, state, states], epochs=3)
    # Legacy .h5 does not restore the optimizer, so the rolling last is a separate .keras.
    expected = directory(files_of("m1", ".h5"), files_of("last-epoch=003-step=12"))
    assert listing(str(tmp_path / "h5")) == expected
    h5 = keras.models.load_model(str(tmp_path / "h5" / "m1.h5"), compile=False)
    assert weights_equal(h5.get_weights(), states.weights[0])
    assert listing(str(tmp_path / "ts")) == directory(files_of("s1"), files_of("s3"))
    restored = keras.models.load_model(str(tmp_path / "ts" / "s3.keras"))
    assert weights_equal(restored.get_weights(), states.weights[2])
    assert int(restored.optimizer.iterations.numpy()) == 12
    records = {r["name"]: r for r in manifest(tmp_path / "ts")["records"]}
    assert (records["s3"]["epoch"], records["s3"]["step"], records["s3"]["format"]) == (2, 12, "training_state")
    assert saved_state(str(tmp_path / "ts" / "s3.keras"))["epoch"] == 2


def test_yaml_policy_and_overrides(tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"dirpath: {tmp_path / 'ck'}\nmonitor: val_loss\ntop_k: 2\nfilename: 'y{{epoch}}'\nlast: false\n",
        encoding="utf-8",
    )
    callback = BestCheckpoint.from_yaml(path, top_k=1)
    assert callback.policy == CheckpointPolicy(
        dirpath=str(tmp_path / "ck"), monitor="val_loss", top_k=1, filename="y{epoch}", last=False
    )
    other = BestCheckpoint(policy=str(path))
    assert other.policy is not None and other.policy.top_k == 2 and other.monitor == "val_loss"
    fit(make_model(), [Script([0.3, 0.5, 0.2]), callback], epochs=3)
    assert listing(str(tmp_path / "ck")) == directory(files_of("y3"))


def test_initial_value_threshold_must_be_beaten(tmp_path: Any) -> None:
    callback = BestCheckpoint(
        monitor="val_loss",
        dirpath=str(tmp_path),
        filename="t{epoch}",
        initial_value_threshold=0.35,
        save_best_only=True,
    )
    fit(make_model(), [Script([0.5, 0.4, 0.3, 0.36]), callback], epochs=4)
    assert tags(tmp_path) == {"t3": ["best"], "t4": ["last"]}
    assert callback.best == 0.3


def test_validation_metric_without_validation_warns_once_and_still_saves_last(tmp_path: Any) -> None:
    callback = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="n{epoch}")
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_model().fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[callback])  # no validation_data
    messages = [str(w.message) for w in caught if "val_loss" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith("Can save best model only with val_loss available. Logged metrics: loss, mae. ")
    assert "Validation did not run this epoch" in messages[0]
    assert tags(tmp_path) == {"n3": ["last"]}
    assert callback.best_model_path == ""


def test_best_score_and_kept_set_survive_a_restart(tmp_path: Any) -> None:
    first = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="r{epoch}", top_k=2, save_best_only=True)
    fit(make_model(), [Script([0.5, 0.3, 0.4]), first], epochs=3)
    assert tags(tmp_path) == {"r1": ["best"], "r2": ["best"], "r3": ["last"]}
    # A new process would build a new model and callback: values worse than the best saved nothing as best.
    model = make_model(seed=1)
    second = BestCheckpoint(
        monitor="val_loss", dirpath=str(tmp_path), filename="r{epoch}", top_k=2, save_best_only=True
    )
    seen = []
    probe = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append(second.best))
    history = fit(model, [Script([9, 9, 9, 0.35, 0.32]), second, probe], epochs=5)
    assert history.epoch == [3, 4]
    assert seen == [0.3]
    assert tags(tmp_path) == {"r1": ["best"], "r2": ["best"], "r5": ["last"]}
    assert second.best == 0.3 and model._initial_epoch is None


def test_resume_restores_weights_and_optimizer(tmp_path: Any) -> None:
    states = Snapshot()
    fit(make_model(), [BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path)), states], epochs=2)
    model = make_model(seed=1)
    seen = []
    probe = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: seen.append((model.get_weights(), int(model.optimizer.iterations.numpy())))
    )
    history = fit(model, [BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path)), probe], epochs=3)
    assert history.epoch == [2]
    assert weights_equal(seen[0][0], states.weights[1]) and seen[0][1] == 8


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    fit(
        make_model(),
        [Script([0.3, 0.5, 0.6]), BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="c{epoch}")],
        epochs=3,
    )
    assert tags(tmp_path) == {"c1": ["best"], "c3": ["last"]}
    newest = tmp_path / "c3.keras"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        history = fit(
            make_model(),
            [Script([0] + [0.4] * 3), BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="c{epoch}")],
            epochs=4,
        )
    assert history.epoch == [1, 2, 3]
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "c3.keras" in skipped[0] and "checksum mismatch" in skipped[0]
    assert tags(tmp_path) == {"c1": ["best"], "c4": ["last"]}


def test_explicit_resume_path(tmp_path: Any) -> None:
    fit(
        make_model(),
        [Script([0.3, 0.5, 0.6]), BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="p{epoch}")],
        epochs=3,
    )
    callback = BestCheckpoint(
        monitor="val_loss", dirpath=str(tmp_path), filename="p{epoch}", resume=str(tmp_path / "p1.keras")
    )
    history = fit(make_model(seed=1), [Script([0] * 3), callback], epochs=3)
    assert history.epoch == [1, 2]
    # The older timeline stays untouched; the forked run keeps its own checkpoints.
    names = sorted(r["name"] for r in manifest(tmp_path)["records"])
    assert names == ["p1", "p2", "p3", "p3-v1"]


def version_1_copy(source: Any, target: Any, member: dict[str, Any] | None) -> dict[str, Any]:
    """`source` (a resumable .keras) copied to `target` as version 1 wrote it; returns version 1's state.

    Version 1's state: format "checkpoint_hooks.keras", the epoch, step, mid_epoch, the seed states of the
    model's SeedGenerators and the Keras version and backend, at the top level. With `member` None it goes
    nowhere (the caller writes it beside the file); else into the zip as `checkpoint_hooks.json`.
    """
    state = saved_state(str(source))
    old = {
        "format": "checkpoint_hooks.keras",
        "epoch": state["epoch"],
        "step": state["step"],
        "mid_epoch": state["mid_epoch"],
        "seed_states": state["extra"]["seed_states"],
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
    }
    target.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as copy:
        for info in archive.infolist():
            if info.filename != "checkpoint_hooks.json":
                copy.writestr(info, archive.read(info))
        if member is not None:
            copy.writestr("checkpoint_hooks.json", json.dumps({**old, **member}))
    return old


def seed_states(model: keras.Model) -> list[Any]:
    return [np.asarray(g.state.numpy()).tolist() for layer in model._flatten_layers() for g in getattr(layer, "_seed_generators", ())]


def resume_from(path: Any, dirpath: Any) -> tuple[keras.callbacks.History, keras.Model, list[Any]]:
    """A fresh model with dropout fits 4 epochs resuming from `path`; the seed states it started with."""
    callback = BestCheckpoint(monitor="val_loss", dirpath=str(dirpath), filename="p{epoch}", resume=str(path))
    model = make_model(seed=1, dropout=True)
    seen: list[Any] = []
    probe = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append(seed_states(model)))
    history = fit(model, [Script([0] * 4), callback, probe], epochs=4)
    return history, model, seen[0]


def test_explicit_resume_path_to_a_version_1_file_with_its_state_beside_it(tmp_path: Any) -> None:
    """Version 1 wrote the epoch, step and seed states to `<file>.state.json` instead of into the .keras."""
    fit(make_model(dropout=True),
        [Script([0.3, 0.5]), BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path / "a"), filename="p{epoch}")],
        epochs=2)
    old = tmp_path / "v1" / "ck.keras"
    state = version_1_copy(tmp_path / "a" / "p2.keras", old, member=None)
    (tmp_path / "v1" / "ck.keras.state.json").write_text(json.dumps(state), encoding="utf-8")

    history, model, seeds = resume_from(old, tmp_path / "b")
    assert history.epoch == [2, 3]
    assert int(model.optimizer.iterations.numpy()) == 16
    assert seeds == state["seed_states"] != seed_states(make_model(seed=1, dropout=True))


def test_a_version_1_file_with_its_state_in_the_zip_resumes(tmp_path: Any) -> None:
    """Version 1's zip member, mid-epoch: its epoch starts over, with its seed states."""
    fit(make_model(dropout=True),
        [Script([0.3, 0.5]), BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path / "a"), filename="p{epoch}")],
        epochs=2)
    old = tmp_path / "v1" / "ck.keras"
    state = version_1_copy(tmp_path / "a" / "p2.keras", old, member={"mid_epoch": True, "epoch_batches": 3})

    history, model, seeds = resume_from(old, tmp_path / "b")
    assert history.epoch == [1, 2, 3]  # epoch 2 (1-based) was not finished: it starts over
    assert int(model.optimizer.iterations.numpy()) == 8 + 3 * 4
    assert seeds == state["seed_states"]


def test_a_second_fit_of_the_same_callback_continues_its_run(tmp_path: Any) -> None:
    callback = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="s{epoch}")
    model = make_model()
    fit(model, [Script([0.3, 0.4]), callback], epochs=2)
    run = callback.engine.run if callback.engine else None
    # The lock is released at fit end: another open file description can take it.
    with open(tmp_path / ".checkpoint_hooks.lock", "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    history = fit(model, [Script([0.2, 0.5]), callback], epochs=2)
    assert history.epoch == [0, 1]  # no reload, no skipped epochs: the model in memory is the newest state
    assert callback.engine is not None and callback.engine.run == run
    assert tags(tmp_path) == {"s1-v1": ["best"], "s2": ["last"]}


def test_mode_auto_takes_the_keras_metric_direction(tmp_path: Any) -> None:
    model = make_model()
    model.compile(optimizer="adam", loss="mse", metrics=[keras.metrics.AUC(name="roc_thing")])
    callback = BestCheckpoint(monitor="val_roc_thing", dirpath=str(tmp_path), filename="a{epoch}")
    x, y = data()
    labels = (y > y.mean()).astype("float32")
    model.fit(x, labels, validation_data=(x, labels), epochs=1, verbose=0, callbacks=[callback])
    assert callback.engine is not None and callback.engine.policy.resolved_mode == "max"


BAD_ARGUMENTS = [
    (dict(dirpath="x", save_freq=5, every_n_steps=4), "Received: save_freq=5, every_n_steps=4"),
    (dict(dirpath="x", save_freq=-1), "save_freq must be 'epoch' or a positive number of batches"),
    (dict(dirpath="x", every_n_minutes=0), "every_n_minutes"),
    (dict(filepath="x/m-{batch}.keras", top_k=2), "the {batch} placeholder"),
    (dict(save_weights_only=True, format="model"), "Received: save_weights_only=True, format='model'"),
    (dict(filepath="x/m.keras", dirpath="y"), "give either filepath or dirpath"),
    (dict(filepath="x/m.h5", format="training_state"), "needs the native .keras format"),
    (dict(filepath="x/m.keras", format="weights"), "format='weights' writes .weights.h5 files"),
    (dict(dirpath="s3://bucket/run", export_best=True), "export_best writes a SavedModel directory"),
    (dict(top_k=-3), "top_k must be -1"),
    (dict(monitor=None, top_k=3), "needs a monitor to rank checkpoints"),
]


def test_bad_policy_arguments_raise_policy_error_and_leave_fit_alone(tmp_path: Any) -> None:
    model = make_model()
    fit(model, [], epochs=1)
    for kwargs, message in BAD_ARGUMENTS:
        with pytest.raises(PolicyError) as caught:
            BestCheckpoint(**kwargs)
        assert message in str(caught.value), (kwargs, str(caught.value))
    assert not os.path.exists("x") and not os.path.exists("y")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel export needs the TensorFlow backend")
def test_export_best_writes_a_loadable_saved_model(tmp_path: Any) -> None:
    import tensorflow as tf

    callback = BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path), filename="x{epoch}", export_best=True)
    states = Snapshot()
    model = make_model()
    fit(model, [Script([0.5, 0.3, 0.4]), callback, states], epochs=3)
    export = tmp_path / "best_export"
    assert callback.export_path == str(export)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".staging-")]
    with open(export / "checkpoint_hooks.json", encoding="utf-8") as f:
        assert json.load(f)["record"] == "x2"
    x, _ = data()
    model.set_weights(states.weights[1])
    loaded = tf.saved_model.load(str(export))
    np.testing.assert_allclose(np.asarray(loaded.serve(x)), model.predict(x, verbose=0), rtol=1e-6)
