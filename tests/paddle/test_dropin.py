"""BestCheckpoint in place of paddle.callbacks.ModelCheckpoint: its arguments, fit(save_dir=...), the other
callbacks on resume, names Model.load(prefix) reads, and a network whose shapes changed."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import paddle
import pytest

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.manifest import sidecar_name
from checkpoint_hooks.paddle import BestCheckpoint
from checkpoint_hooks.policy import PolicyError
from tests.paddle.toy import VAL_OFFSETS, Recorder, Regression, manifest_records, regression_model


def fit(callback: BestCheckpoint, epochs: int, *extra: paddle.callbacks.Callback, model=None, **kwargs):
    model = model if model is not None else regression_model()
    eval_data = Regression(16, seed=1, offsets=VAL_OFFSETS)
    recorder = Recorder(eval_data)
    model.fit(Regression(), eval_data, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[callback, recorder, *extra], **kwargs)
    return model, recorder


# -- Paddle's arguments -----------------------------------------------------------------------


def test_paddles_positional_and_keyword_arguments_are_accepted(tmp_path):
    positional = BestCheckpoint(2, str(tmp_path / "a"))
    keywords = BestCheckpoint(save_freq=2, save_dir=str(tmp_path / "a"))
    for callback in (positional, keywords):
        assert isinstance(callback, paddle.callbacks.ModelCheckpoint)
        assert callback.policy.dirpath == str(tmp_path / "a") == callback.save_dir
        assert callback.policy.snapshots.every_n_epochs == 2 and callback.save_freq == 2
    assert positional.policy == keywords.policy
    # The same directory under both names, and save_freq merged into snapshots' other fields, are fine.
    both = BestCheckpoint(save_dir="d", dirpath="d", save_freq=3, snapshots={"keep": 1})
    assert both.policy.dirpath == "d" and both.policy.snapshots.model_dump()["every_n_epochs"] == 3
    assert both.policy.snapshots.keep == 1
    assert BestCheckpoint(dirpath="d").policy.snapshots.every_n_epochs is None  # no save_freq: no snapshots


def test_save_freq_saves_a_snapshot_every_n_epochs(tmp_path):
    callback = BestCheckpoint(2, str(tmp_path), top_k=1)
    fit(callback, 4)
    tagged = {r["epoch"]: r["tags"] for r in manifest_records(str(tmp_path))}
    assert tagged == {1: ["snapshot"], 3: ["best", "last", "snapshot"]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_dir": "a", "dirpath": "b"}, r"save_dir \(Paddle's name\) and dirpath name the same directory; give one "
         r"of them. Received: save_dir='a', dirpath='b'"),
        ({"save_freq": 2, "snapshots": 3}, r"save_freq=N and snapshots ask for the same thing .* Received: "
         r"save_freq=2, snapshots=3"),
        ({"save_freq": 0}, r"save_freq .* must be a positive number of epochs between snapshots. Received: save_freq=0"),
        ({"save_freq": True}, r"Received: save_freq=True"),
    ],
)
def test_conflicting_or_wrong_arguments_are_refused(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        BestCheckpoint(**kwargs)


def test_a_metric_in_the_first_place_is_pointed_to_monitor():
    with pytest.raises(PolicyError, match=r"to rank by a metric pass monitor='val_loss'. Received: save_freq='val_loss'"):
        BestCheckpoint("val_loss")


# -- fit(save_dir=...) --------------------------------------------------------------------------


def test_fit_save_dir_is_where_a_callback_without_a_directory_writes(tmp_path):
    directory = str(tmp_path / "from_fit")
    callback = BestCheckpoint(top_k=-1)
    fit(callback, 4, save_dir=directory, save_freq=2)
    assert callback.policy.dirpath == directory
    # hapi added no ModelCheckpoint of its own (it would write 0.pdparams ... final.pdparams).
    assert not any(n.split(".")[0] in ("0", "1", "final") for n in os.listdir(directory))
    records = manifest_records(directory)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [r["epoch"] for r in records if "snapshot" in r["tags"]] == [1, 3]  # fit's save_freq=2
    assert callback.best_model_path.startswith(directory + os.sep)

    again = BestCheckpoint(top_k=-1)  # the same script run again resumes from fit's save_dir
    _, recorder = fit(again, 5, model=regression_model(seed=2), save_dir=directory)
    assert again.resumed_from is not None and again.resumed_from.epoch == 3 and recorder.trained == [4]


def test_a_different_fit_save_dir_is_ignored_with_one_warning(tmp_path, caplog):
    own, other = str(tmp_path / "own"), str(tmp_path / "other")
    callback = BestCheckpoint(dirpath=own)
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        model, _ = fit(callback, 1, save_dir=other)
        fit(callback, 2, model=model, save_dir=other)
    warnings = [r.getMessage() for r in caplog.records if "save_dir" in r.getMessage()]
    assert warnings == [f"fit(save_dir={other!r}) is ignored: BestCheckpoint writes to its own dirpath {own!r}; "
                        "pass the directory to one of them only"]
    assert [r["epoch"] for r in manifest_records(own)] == [1]
    assert not os.path.exists(other)


# -- the other callbacks on resume ----------------------------------------------------------------


class ReadsLoss(paddle.callbacks.Callback):
    """A user's callback that reads logs["loss"] where hapi always puts it."""

    def __init__(self) -> None:
        super().__init__()
        self.begun: list[int] = []
        self.train_loss: dict[int, float] = {}
        self.eval_loss: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.train_loss[epoch] = float(logs["loss"][0])

    def on_eval_end(self, logs=None):
        self.eval_loss.append(float(logs["loss"][0]))


def test_other_callbacks_hear_only_the_epochs_that_run_with_real_logs(tmp_path):
    first = ReadsLoss()
    fit(BestCheckpoint(dirpath=str(tmp_path)), 2, first)
    assert first.begun == [0, 1] and len(first.eval_loss) == 2

    resumed = ReadsLoss()
    callback = BestCheckpoint(dirpath=str(tmp_path))
    _, recorder = fit(callback, 4, resumed, model=regression_model(seed=3))
    assert callback.start_epoch == 2 and recorder.trained == [2, 3]
    assert resumed.begun == [2, 3] and sorted(resumed.train_loss) == [2, 3]
    assert len(resumed.eval_loss) == 2 and all(np.isfinite(resumed.eval_loss))

    done = ReadsLoss()
    fit(BestCheckpoint(dirpath=str(tmp_path)), 4, done)  # every epoch was done: nothing runs
    assert done.begun == [] and done.eval_loss == []


# -- names Model.load(prefix) reads --------------------------------------------------------------


def test_default_names_have_no_dot_and_load_with_model_load(tmp_path):
    callback = BestCheckpoint(dirpath=str(tmp_path), monitor="val_loss", top_k=2)
    fit(callback, 3)
    names = [r["name"] for r in manifest_records(str(tmp_path))]
    assert names and all("." not in n for n in names), names
    best = callback.best_model_path
    value = callback.best_model_score
    assert os.path.basename(best) == f"epoch=001-val_loss={value:.4f}".replace(".", "_") + ".pdparams"

    fresh = regression_model(seed=9)
    fresh.load(best.removesuffix(".pdparams"))  # hapi's own loader, from the prefix
    saved = paddle.load(best)
    for key, tensor in fresh.network.state_dict().items():
        assert np.array_equal(tensor.numpy(), saved[key].numpy()), key


def test_a_second_run_beside_the_first_gets_its_own_names(tmp_path):
    fit(BestCheckpoint(dirpath=str(tmp_path), monitor="val_loss", top_k=1, last=False), 1)
    fit(BestCheckpoint(dirpath=str(tmp_path), monitor="val_loss", top_k=1, last=False, resume="never"), 1)
    first, second = [r["name"] for r in manifest_records(str(tmp_path))]
    assert second == first + "-v1" and "." not in first


def test_a_filename_template_that_makes_a_dot_is_refused_when_built(tmp_path):
    with pytest.raises(PolicyError, match=r"filename='e\{epoch\}-\{val_loss:.3f\}' makes names with a dot \(e.g. "
                       r"'e1-0.500'\), and paddle.Model.load\(prefix\) reads what follows a dot as a file extension"):
        BestCheckpoint(dirpath=str(tmp_path), monitor="val_loss", filename="e{epoch}-{val_loss:.3f}")
    with pytest.raises(PolicyError, match="makes names with a dot"):
        BestCheckpoint(dirpath=str(tmp_path), filename="run.{epoch}", format="weights")
    # Without a dot it is fine, and so is a `model` checkpoint (a folder read with paddle.jit.load).
    BestCheckpoint(dirpath=str(tmp_path), monitor="val_loss", filename="e{epoch}-{val_loss:.0e}")
    BestCheckpoint(dirpath=str(tmp_path), monitor="val_loss", filename="e{epoch}-{val_loss:.3f}", format="model")


def dotted(directory: str) -> None:
    """Give the directory's checkpoints the dotted names of earlier releases (epoch=001-val_loss=0.1702)."""
    store = CheckpointDirectory(directory)
    manifest = store.read_manifest()
    assert manifest is not None
    for record in manifest.records:
        if "=" not in record.name.split("-")[-1] or record.name.startswith("last-"):
            continue
        old = record.name[::-1].replace("_", ".", 1)[::-1]
        files = []
        for entry in record.files:
            path = old + entry.path[len(record.name):]
            os.rename(os.path.join(directory, entry.path), os.path.join(directory, path))
            files.append(replace(entry, path=path))
        os.remove(os.path.join(directory, sidecar_name(record.name)))
        manifest.discard(record.name)
        manifest.put(replace(record, name=old, files=tuple(files)))
    store.commit(manifest)


def test_a_directory_with_the_dotted_names_of_earlier_releases_still_resumes(tmp_path):
    directory = str(tmp_path / "ck")
    fit(BestCheckpoint(dirpath=directory, monitor="val_loss", top_k=-1), 2)
    dotted(directory)
    newest = max(manifest_records(directory), key=lambda r: r["epoch"])["name"]
    assert newest.startswith("epoch=001-val_loss=") and "." in newest

    callback = BestCheckpoint(dirpath=directory, monitor="val_loss", top_k=-1)
    _, recorder = fit(callback, 3, model=regression_model(seed=4))
    assert callback.resumed_from is not None and callback.resumed_from.name == newest
    assert recorder.trained == [2]


# -- a network whose shapes changed ------------------------------------------------------------------


def wider_model() -> paddle.Model:
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(4, 16), paddle.nn.Tanh(), paddle.nn.Linear(16, 1))
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Adam(0.05, parameters=net.parameters()), paddle.nn.MSELoss())
    return model


def test_a_network_whose_shapes_changed_gets_one_clear_error(tmp_path):
    directory = str(tmp_path / "ck")
    fit(BestCheckpoint(dirpath=directory), 1)
    with pytest.raises(CheckpointError) as caught:
        fit(BestCheckpoint(dirpath=directory), 2, model=wider_model())
    message = str(caught.value)
    assert "\n" not in message and "lacks" not in message
    assert message == (
        f"checkpoint {os.path.join(directory, 'epoch=000-step=4.pdparams')} does not fit this network: 0.weight has "
        "shape [4, 8] in the checkpoint and [4, 16] in the network (the model changed since it was saved); resume "
        "with the network it was saved from, set resume='never' to start over, or give another dirpath"
    )
    # Both ways out work.
    fit(BestCheckpoint(dirpath=directory, resume="never"), 1, model=wider_model())
    fresh = str(tmp_path / "elsewhere")
    fit(BestCheckpoint(dirpath=fresh), 1, model=wider_model())
    assert [r["epoch"] for r in manifest_records(fresh)] == [0]


def test_running_a_finished_script_again_says_training_is_complete(tmp_path, caplog):
    fit(BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path)), 2)
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        fit(BestCheckpoint(monitor="val_loss", dirpath=str(tmp_path)), 2)
    said = [r.getMessage() for r in caplog.records if "already completed" in r.getMessage()]
    assert len(said) == 1 and "2 epoch(s)" in said[0] and str(tmp_path) in said[0] and "resume='never'" in said[0]
