"""BestCheckpoint as a drop-in ModelCheckpoint: its arguments, names, attributes and files behave the same."""

from __future__ import annotations

import inspect
import math
import os
import pickle

import lightning.pytorch as LP
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from checkpoint_hooks.lightning import BestCheckpoint
from tests.index import read_index
from tests.lightning.models import loader, make_module, trainer


def fit(cb, epochs, module=None, **kw):
    t = trainer(LP, [cb], epochs, **kw)
    t.fit(module or make_module(LP), loader(), loader())
    return t


def test_positional_arguments_and_annotations_are_model_checkpoints():
    ours, theirs = inspect.signature(BestCheckpoint).parameters, inspect.signature(ModelCheckpoint).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert ours["save_last"].annotation == theirs["save_last"].annotation | None
    cb = BestCheckpoint("~/ckpt", "{epoch}", "val_loss")
    assert (cb.dirpath, cb.filename, cb.monitor) == (os.path.realpath(os.path.expanduser("~/ckpt")), "{epoch}", "val_loss")


def test_state_key_is_model_checkpoints_so_their_checkpoints_load_into_each_other():
    args = {"monitor": "val_loss", "every_n_train_steps": 3}
    assert BestCheckpoint(**args).state_key == ModelCheckpoint(**args).state_key


def test_names_attributes_and_last_ckpt_as_model_checkpoint(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, save_last=True)
    fit(cb, 3)
    kept = sorted(os.path.basename(p) for p in cb.best_k_models)
    assert all(n.startswith("epoch=") and n.endswith(".ckpt") and "-step=" in n for n in kept) and len(kept) == 2
    assert cb.last_model_path == str(tmp_path / "last.ckpt")
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 12
    state = last["callbacks"][cb.state_key]
    assert state["current_score"] is not None and state["dirpath"] == str(tmp_path)
    assert cb.current_score == pytest.approx(state["current_score"].item())


def test_save_last_link_is_a_symlink_and_refused_on_remote_paths(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last="link")
    fit(cb, 2)
    assert os.path.islink(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 1
    remote = BestCheckpoint(dirpath="memory://bucket/run", save_last="link")
    with pytest.raises(ValueError, match="save_last='link'.* is only supported for local file paths"):
        remote.setup(trainer(LP, [remote], 1), make_module(LP), "fit")


def test_monitor_epoch_and_unlogged_placeholder_save_as_model_checkpoint(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path, monitor="step", mode="max", filename="{epoch}-{not_logged}")
    fit(cb, 2)
    assert cb.best_model_path == str(tmp_path / "epoch=1-not_logged=0.0.ckpt")  # ModelCheckpoint: not_logged=0
    assert cb.best_model_score.item() == 8


def test_nan_scores_rank_last_with_infinite_current_score(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path, monitor="val_metric", mode="max")
    fit(cb, 1, module=make_module(LP, scripted=[math.nan]))
    assert cb.current_score.item() == -math.inf and cb.best_model_score.item() == -math.inf


def test_save_on_exception_writes_its_named_file(tmp_path):
    class Failing(LP.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("Trouble!")

    cb = BestCheckpoint(dirpath=tmp_path, filename="exception", save_on_exception=True)
    t = trainer(LP, [cb, Failing()], 3)
    with pytest.raises(RuntimeError, match="Trouble!"):
        t.fit(make_module(LP), loader(), loader())
    assert torch.load(tmp_path / "exception.ckpt", weights_only=False)["global_step"] == 8


def test_best_path_before_fit_comes_from_the_directory(tmp_path):
    first = BestCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2)
    fit(first, 3)
    fresh = BestCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2)
    assert fresh.best_model_path == first.best_model_path
    t = trainer(LP, [fresh], 1)
    t.test(make_module(LP), loader(), ckpt_path="best", verbose=False)
    assert t.ckpt_path == first.best_model_path


def test_pickles_without_its_session(tmp_path):
    cb = BestCheckpoint(dirpath=tmp_path, monitor="val_loss")
    copy = pickle.loads(pickle.dumps(cb))
    assert vars(copy) == vars(cb) and "session" not in vars(cb)
    assert copy.session is not cb.session and copy.session.policy == cb.policy


def test_dirpath_holds_only_checkpoint_files_and_the_run_still_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    cb = BestCheckpoint(dirpath=ckpt, monitor="val_loss", save_top_k=2, save_last=True)
    fit(cb, 3)
    records = read_index(ckpt)["records"]
    assert sorted(os.listdir(ckpt)) == sorted({r["files"][0]["path"] for r in records} | {"last.ckpt"})
    assert os.path.exists(tmp_path / ".ckpt.checkpoint_hooks" / "manifest.json")  # the index, beside it
    again = BestCheckpoint(dirpath=ckpt, monitor="val_loss", save_top_k=2, save_last=True)
    assert fit(again, 4).global_step == 16  # the same script, one epoch more: continued from epoch 3
    # with a policy field the policy's layout holds: the index inside the directory
    policy_mode = BestCheckpoint(dirpath=tmp_path / "policy", monitor="val_loss", top_k=2)
    fit(policy_mode, 1)
    assert os.path.exists(tmp_path / "policy" / "manifest.json")
