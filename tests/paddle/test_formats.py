"""Each save kind loads back into Paddle; misconfigurations fail at fit start with a clear message."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from checkpoint_hooks.core import MonitorError, resume_state
from checkpoint_hooks.paddle import STATE_KEY, BestCheckpoint
from checkpoint_hooks.policy import PolicyError
from tests.paddle.toy import (
    STEPS_PER_EPOCH,
    Classes,
    Regression,
    classifier_model,
    listing,
    regression_model,
)


def params(model: paddle.Model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.network.state_dict().items()}


def test_weights_are_the_network_state_dict(tmp_path):
    model = classifier_model()
    callback = BestCheckpoint(dirpath=str(tmp_path), format="weights", last=False)
    model.fit(Classes(), Classes(16, seed=1), batch_size=8, epochs=2, verbose=0, callbacks=[callback])

    assert listing(str(tmp_path)) == sorted(
        [".checkpoint_hooks.lock", "manifest.head", "manifest.json", "epoch=001-step=8.meta.json", "epoch=001-step=8.pdparams"]
    )
    record = callback.engine.best_record
    assert set(record.metrics) == {"loss", "acc", "val_loss", "val_acc"}
    assert record.metrics["val_acc"] != record.metrics["acc"]  # eval values did not overwrite training ones

    fresh = classifier_model(seed=3)
    assert fresh.network.set_state_dict(paddle.load(callback.best_model_path)) == ([], [])
    assert params(fresh).keys() == params(model).keys()
    for key, value in params(model).items():
        assert np.array_equal(params(fresh)[key], value), key


def test_model_is_a_jit_inference_model(tmp_path):
    model = regression_model(inputs=True)
    # No monitor and top_k=1: the newest, i.e. the final network, is kept.
    callback = BestCheckpoint(dirpath=str(tmp_path), format="model", filename="m{epoch}")
    data = Regression()
    model.fit(data, Regression(16, seed=1), batch_size=8, epochs=2, verbose=0, callbacks=[callback])

    last = f"last-epoch=001-step={2 * STEPS_PER_EPOCH}"
    assert listing(str(tmp_path)) == sorted(
        [".checkpoint_hooks.lock", "manifest.head", "manifest.json", "m1.meta.json", "m1",
         f"{last}.meta.json", f"{last}.pdparams", f"{last}.pdopt"]
    )
    assert listing(str(tmp_path / "m1")) == ["model.json", "model.pdiparams"]
    assert callback.best_model_path == str(tmp_path / "m1" / "model.json")
    loaded = paddle.jit.load(str(tmp_path / "m1" / "model"))
    x = paddle.to_tensor(data.x)
    np.testing.assert_allclose(loaded(x).numpy(), model.network(x).numpy(), rtol=1e-6, atol=1e-7)


def test_model_format_needs_input_specs(tmp_path):
    model = regression_model(inputs=False)
    callback = BestCheckpoint(dirpath=str(tmp_path), format="model")
    with pytest.raises(PolicyError, match=r"format='model' .* needs the input specs.*InputSpec.*Received: paddle\.Model\(\.\.\., inputs=None\)"):
        model.fit(Regression(), batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert not tmp_path.exists() or listing(str(tmp_path)) == []
    # Nothing was left locked or patched: the same model trains on with another format.
    assert "_run_one_epoch" not in model.__dict__
    other = BestCheckpoint(dirpath=str(tmp_path), format="weights", last=False)
    model.fit(Regression(), batch_size=8, epochs=1, verbose=0, callbacks=[other])
    assert "epoch=000-step=4.pdparams" in listing(str(tmp_path))


def test_training_state_is_what_model_load_reads(tmp_path):
    model = regression_model()
    callback = BestCheckpoint(dirpath=str(tmp_path))
    model.fit(Regression(), Regression(16, seed=1), batch_size=8, epochs=3, verbose=0, callbacks=[callback])

    path = callback.last_model_path
    assert path == callback.best_model_path == str(tmp_path / "epoch=002-step=12.pdparams")
    fresh = regression_model(seed=4)
    fresh.load(path)
    for key, value in params(model).items():
        assert np.array_equal(params(fresh)[key], value), key
    # The optimizer state (moments, beta powers, LR scheduler) is what the optimizer held.
    saved = model._optimizer.state_dict()
    loaded = dict(fresh._optimizer.state_dict())
    loaded.pop("StructuredToParameterName@@")  # paddle.save's name table rides along in the holder
    state = loaded.pop(STATE_KEY)  # and so does the callback's state: optimizers ignore both
    assert loaded["LR_Scheduler"] == saved["LR_Scheduler"] and saved["LR_Scheduler"]["last_epoch"] == 12
    assert sorted(loaded) == sorted(saved)
    for key in saved:
        if key != "LR_Scheduler":
            assert np.array_equal(np.asarray(loaded[key]), saved[key].numpy()), key

    payload = resume_state.read(state)  # plain data: the resume payload every adapter writes
    assert payload is not None and state["format"] == resume_state.FORMAT
    assert payload.epoch == 2 and payload.step == 12 and not payload.mid_epoch
    assert payload.extra["param_names"] == {name: p.name for name, p in model.network.named_parameters()}
    assert payload.extra["learning_rate"] is None  # a scheduler's rate lives in the .pdopt
    assert payload.extra["world_size"] == 1
    assert sorted(payload.rng_of(0)) == ["numpy", "paddle", "python"]


def test_monitor_mistakes_are_reported_with_the_available_names(tmp_path):
    model = regression_model()
    with pytest.raises(MonitorError, match=r"monitor='val_loss' is an evaluation metric but fit\(\) got no eval_data"):
        model.fit(Regression(), batch_size=8, epochs=1, verbose=0,
                  callbacks=[BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path))])
    with pytest.raises(MonitorError, match=r"monitor='val_acc' is not among the logged metrics \(loss, val_loss\)"):
        model.fit(Regression(), Regression(16, seed=1), batch_size=8, epochs=1, verbose=0,
                  callbacks=[BestCheckpoint(monitor="val_acc", dirpath=str(tmp_path))])
    assert "_run_one_epoch" not in model.__dict__
    assert [n for n in listing(str(tmp_path)) if n.endswith(".pdparams")] == []
