"""BestCheckpoint in real Lightning fits: parity with ModelCheckpoint, spellings, formats, attributes."""

from __future__ import annotations

import logging
import math
import os
import re

import lightning.pytorch as LP
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from checkpoint_hooks import CheckpointPolicy, PolicyError
from checkpoint_hooks.core.errors import MonitorError
from checkpoint_hooks.lightning import BestCheckpoint, lightning_filename
from tests.index import read_index
from tests.lightning.models import loader, make_module, trainer
from tests.spies import TakenArrays

NAN = float("nan")


def fit(L, cb, epochs, module=None, **kw):
    t = trainer(L, [cb], epochs, **kw)
    t.fit(module or make_module(L), loader(), loader())
    return t


def manifest(path):
    return read_index(path)


def kept_epochs(path, tag="best"):
    return sorted(r["epoch"] for r in manifest(path)["records"] if tag in r["tags"])


@pytest.mark.parametrize(
    "values, k, mode",
    [
        ([3.0, 1.0, 2.0, 0.5, 4.0, 0.7], 2, "min"),
        ([1.0, 1.0, 1.0, NAN, 0.5, 1.0], 2, "min"),
        ([NAN, 1.0, 2.0, 2.0, 0.1], 3, "max"),
        ([0.2, 0.4, 0.4, 0.1, 0.9, 0.9], 1, "max"),
    ],
)
def test_top_k_keeps_what_model_checkpoint_keeps(tmp_path, values, k, mode):
    reference = LP.callbacks.ModelCheckpoint(dirpath=tmp_path / "mc", monitor="val_metric", mode=mode, save_top_k=k)
    fit(LP, reference, len(values), make_module(LP, scripted=values))
    theirs = sorted(int(re.match(r"epoch=(\d+)", n).group(1)) for n in os.listdir(tmp_path / "mc"))
    ours = BestCheckpoint(monitor="val_metric", mode=mode, dirpath=tmp_path / "bc", save_top_k=k, save_last=False)
    fit(LP, ours, len(values), make_module(LP, scripted=values))
    assert kept_epochs(tmp_path / "bc") == theirs
    best_theirs = reference.best_model_score.item()
    assert (ours.best_model_score.item() == best_theirs) or (math.isnan(best_theirs) and ours.best_model_score is None)


def test_both_namespaces_find_it_as_their_checkpoint_callback(tmp_path, L):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path / "ckpt")
    t = fit(L, cb, 2, default_root_dir=tmp_path)
    assert t.checkpoint_callback is cb
    assert t.checkpoint_callbacks == [cb]  # Lightning added no ModelCheckpoint of its own
    assert sorted(os.listdir(tmp_path)) == [".ckpt.checkpoint_hooks", "ckpt"]  # the index lies beside dirpath
    assert kept_epochs(tmp_path / "ckpt") == [1] or kept_epochs(tmp_path / "ckpt") == [0]
    assert kept_epochs(tmp_path / "ckpt", "last") == [1]


def test_default_dirpath_is_stable_under_default_root_dir(tmp_path):
    cb = BestCheckpoint(monitor="val_loss")
    fit(LP, cb, 1, default_root_dir=tmp_path)
    assert cb.dirpath == str(tmp_path / "checkpoints")
    assert cb.best_model_path == str(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt")  # ModelCheckpoint's name


def test_model_checkpoint_spellings_map_onto_the_policy(tmp_path):
    cb = BestCheckpoint(
        monitor="val_loss", dirpath=tmp_path, filename="{epoch}-{val_loss:.2f}", save_top_k=2,
        save_last=False, every_n_epochs=2, save_weights_only=True, verbose=True,
    )
    p = cb.policy
    assert (p.top_k, p.last, p.snapshots.every_n_epochs, p.format, p.verbose) == (2, False, None, "weights", True)
    assert p.filename == "epoch={epoch}-val_loss={val_loss:.2f}"
    fit(LP, cb, 4)
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt"))
    assert all(re.fullmatch(r"epoch=\d-val_loss=\d+\.\d\d\.weights\.pt", n) for n in names), names
    # every_n_epochs=2 as in ModelCheckpoint: ranked after the 2nd and 4th epochs only (top 2 keeps both)
    assert kept_epochs(tmp_path) == [1, 3]
    assert kept_epochs(tmp_path, "last") == []


def test_lightning_filename():
    assert lightning_filename("{epoch}-{step}") == "epoch={epoch}-step={step}"
    assert lightning_filename("epoch={epoch}-{val_loss:.3f}") == "epoch={epoch}-val_loss={val_loss:.3f}"


def test_unsupported_and_contradicting_arguments():
    with pytest.raises(PolicyError, match="give save_top_k or top_k"):
        BestCheckpoint(monitor="val_loss", save_top_k=2, top_k=3)
    with pytest.raises(PolicyError, match="top_k=3 needs a monitor"):
        BestCheckpoint(top_k=3)
    # ModelCheckpoint's own arguments get ModelCheckpoint's own checks and errors
    with pytest.raises(MisconfigurationException, match="save_top_k=3, monitor=None"):
        BestCheckpoint(save_top_k=3)
    with pytest.raises(MisconfigurationException, match="Invalid value for save_top_k=-3"):
        BestCheckpoint(monitor="val_loss", save_top_k=-3)
    with pytest.raises(PolicyError, match="unknown field 'topk'; did you mean 'top_k'"):
        BestCheckpoint(monitor="val_loss", topk=3)


def test_missing_monitor_raises_after_validation_listing_keys(tmp_path):
    cb = BestCheckpoint(monitor="val_acc", dirpath=tmp_path)
    with pytest.raises(MonitorError) as info:
        fit(LP, cb, 2)
    message = str(info.value)
    assert "monitor='val_acc' is not among the logged metrics" in message
    assert "train_loss" in message and "val_loss" in message


def test_attributes_and_ckpt_path_best_and_last(tmp_path):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=2)
    t = fit(LP, cb, 3)
    records = {r["name"]: r for r in manifest(tmp_path)["records"]}
    best = min((r for r in records.values() if "best" in r["tags"]), key=lambda r: r["metrics"]["val_loss"])
    assert cb.best_model_path == str(tmp_path / best["files"][0]["path"])
    assert cb.best_model_score.item() == pytest.approx(best["metrics"]["val_loss"])
    assert set(cb.best_k_models) == {str(tmp_path / r["files"][0]["path"]) for r in records.values() if "best" in r["tags"]}
    assert cb.kth_best_model_path in cb.best_k_models
    last = next(r for r in records.values() if "last" in r["tags"])
    assert cb.last_model_path == str(tmp_path / last["files"][0]["path"]) and last["epoch"] == 2
    t.test(ckpt_path="best", dataloaders=loader(), verbose=False)
    assert t.ckpt_path == cb.best_model_path
    # ckpt_path="last" in a fresh process-like setup: a new trainer and callback find our last checkpoint
    cb2 = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=2, resume="never")
    t2 = trainer(LP, [cb2], 4)
    t2.fit(make_module(LP), loader(), loader(), ckpt_path="last")
    assert t2.ckpt_path == cb.last_model_path
    assert t2.global_step == 16  # 3 epochs restored + 1 trained, 4 batches each


@pytest.mark.parametrize("fmt", ["weights", "model", "training_state"])
def test_save_kinds_load_back(tmp_path, fmt, caplog):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, format=fmt)
    module = make_module(LP)
    fit(LP, cb, 1, module)
    path = cb.best_model_path
    if fmt == "weights":
        assert path.endswith(".weights.pt")
        state = torch.load(path, weights_only=True)
        fresh = make_module(LP)
        fresh.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), module.state_dict().values()))
        # the rolling last is still a full training state
        assert cb.last_model_path.endswith(".ckpt") and "optimizer_states" in torch.load(cb.last_model_path, weights_only=False)
    elif fmt == "model":
        assert path.endswith(".model.pt")
        loaded = torch.load(path, weights_only=False)
        assert type(loaded).__name__ == "TinyLP"
        assert torch.equal(loaded.net[0].weight, module.net[0].weight)
        assert "format='model' pickles the TinyLP class" in caplog.text
    else:
        ckpt = torch.load(path, weights_only=False)
        assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "global_step"} <= set(ckpt)
        state = ckpt["checkpoint_hooks"]  # the resume payload: where training was, and every rank's RNG
        assert (state["format"], state["epoch"], state["step"], state["mid_epoch"]) == ("checkpoint_hooks.resume", 0, 4, False)
        assert {"python", "numpy", "torch"} <= set(state["rng"][0])
        assert torch.load(path, weights_only=True)["checkpoint_hooks"] == state


def test_policy_object_and_yaml(tmp_path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(f"dirpath: {tmp_path / 'y'}\nmonitor: val_loss\ntop_k: 2\nsnapshots:\n  every_n_epochs: 1\n  keep: 1\n")
    cb = BestCheckpoint.from_yaml(policy_file)
    fit(LP, cb, 3)
    assert len(kept_epochs(tmp_path / "y")) == 2 and kept_epochs(tmp_path / "y", "snapshot") == [2]
    cb2 = BestCheckpoint(policy=CheckpointPolicy(dirpath=str(tmp_path / "p"), monitor="val_loss"), top_k=3)
    assert cb2.policy.top_k == 3 and cb2.policy.dirpath == str(tmp_path / "p")


def test_user_ckpt_path_wins_over_auto_resume(tmp_path):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1)
    fit(LP, cb, 3)
    first = sorted(cb.best_k_models)[0]  # epoch 0's checkpoint
    cb2 = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1)
    t = trainer(LP, [cb2], 2)
    t.fit(make_module(LP), loader(), loader(), ckpt_path=first)
    assert t.ckpt_path == first and t.global_step == 8  # epoch 0 restored, epoch 1 trained


def test_corrupt_newest_is_skipped_with_a_warning(tmp_path, caplog):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1)
    fit(LP, cb, 3)
    newest = cb.last_model_path
    with open(newest, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    caplog.set_level(logging.INFO, "checkpoint_hooks")
    cb2 = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1, verbose=True)
    t = fit(LP, cb2, 4)
    assert f"skipping checkpoint {newest} for resume: " in caplog.text and "checksum mismatch" in caplog.text
    assert "resuming from" in caplog.text and "epoch=001" in caplog.text
    assert t.global_step == 16
    assert kept_epochs(tmp_path) == [0, 1, 2, 3]


def test_resume_never_starts_fresh(tmp_path):
    fit(LP, BestCheckpoint(monitor="val_loss", dirpath=tmp_path), 2)
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, resume="never")
    t = fit(LP, cb, 1)
    assert t.global_step == 4


def test_step_trigger_saves_mid_epoch_and_resumes(tmp_path):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, every_n_steps=3)
    t = fit(LP, cb, 2)  # 4 batches an epoch: steps 3 and 6 are mid-epoch, 4 and 8 end epochs
    history = manifest(tmp_path)
    assert t.global_step == 8
    lasts = [r for r in history["records"] if "last" in r["tags"]]
    assert [(r["epoch"], r["step"], r["mid_epoch"]) for r in lasts] == [(1, 8, False)]
    # the step saves happened (their records were superseded as last and pruned)
    assert any(h["step"] == 4 for h in history["history"])
    cb2 = BestCheckpoint(monitor="val_loss", dirpath=tmp_path / "mid", every_n_steps=3, last=False, top_k=0)
    fit(LP, cb2, 2)
    (only,) = manifest(tmp_path / "mid")["records"]
    assert (only["name"], only["mid_epoch"], only["epoch"]) == ("last-epoch=001-step=6", True, 1)
    cb3 = BestCheckpoint(monitor="val_loss", dirpath=tmp_path / "mid", last=False, top_k=0)
    t3 = fit(LP, cb3, 2)
    assert t3.global_step == 8  # Lightning restored mid-epoch progress: 2 more steps, not a whole epoch


def test_step_trigger_counts_from_the_step_of_a_user_ckpt_path(tmp_path, caplog):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1)
    fit(LP, cb, 1)  # one epoch: step 4
    caplog.set_level(logging.INFO, "checkpoint_hooks")
    cb2 = BestCheckpoint(monitor="val_loss", dirpath=tmp_path / "steps", every_n_steps=3, top_k=0, verbose=True)
    t = trainer(LP, [cb2], 2)
    t.fit(make_module(LP), loader(), loader(), ckpt_path=cb.last_model_path)
    saved = re.findall(r"saved epoch \d+ .*?: \S*/(\S+)", caplog.text)
    # step 6 is the only multiple of 3 in steps 5-8; Lightning restores step 4 only after on_fit_start
    assert saved[0] == "last-epoch=001-step=6.ckpt" and saved[1].startswith("epoch=001-val_loss=") and len(saved) == 2, saved


def test_model_checkpoint_step_trigger_ranks_like_an_epoch_end(tmp_path):
    # ModelCheckpoint(every_n_train_steps=3): a top-k candidate named by filename at steps 3 and 6 (mid-epoch),
    # none at epoch ends (every_n_epochs then defaults to 0); the policy's own every_n_steps is the rolling last
    cb = BestCheckpoint(monitor="step", mode="max", dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    assert cb.policy.every_n_steps is None
    fit(LP, cb, 2)  # 4 batches an epoch
    records = manifest(tmp_path)["records"]
    assert sorted((r["name"], r["mid_epoch"]) for r in records if "best" in r["tags"]) == [
        ("epoch=0-step=3", True), ("epoch=1-step=6", True),
    ]
    assert cb.best_model_path == str(tmp_path / "epoch=1-step=6.ckpt")


def test_time_trigger_is_model_checkpoints_train_time_interval(tmp_path):
    from datetime import timedelta

    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, train_time_interval=timedelta(seconds=30), save_on_exception=False)
    assert (cb.policy.every_n_minutes, cb.policy.save_on_preemption) == (None, False)
    assert cb._train_time_interval == timedelta(seconds=30)  # ModelCheckpoint's own trigger, ranking top-k


def test_validation_inside_the_epoch_ranks_and_resumes_there(tmp_path):
    # val_check_interval=0.5: validation after batches 2 and 4 of each epoch; ModelCheckpoint ranks at each
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, save_top_k=-1, filename="{epoch}-{step}")
    t = trainer(LP, [cb], 2, val_check_interval=0.5)
    t.fit(make_module(LP), loader(), loader())
    best = sorted((r["step"], r["mid_epoch"]) for r in manifest(tmp_path)["records"] if "best" in r["tags"])
    assert best == [(2, True), (4, False), (6, True), (8, False)]
    # the newest mid-epoch one is where a run resumes from once later ones are gone
    again = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, resume=str(tmp_path / "epoch=1-step=6.ckpt"))
    t2 = trainer(LP, [again], 2, val_check_interval=0.5)
    t2.fit(make_module(LP), loader(), loader())
    assert t2.global_step == 8  # Lightning continued mid-epoch: 2 more steps


def test_background_saves_copy_into_the_tensors_of_the_save_before(tmp_path, monkeypatch):
    taken = TakenArrays(monkeypatch)
    cb = BestCheckpoint(monitor=None, dirpath=tmp_path, top_k=-1, last=False, async_save=True)
    fit(LP, cb, 4)
    saves = taken.by_save(4)
    assert len(saves[0]) == len(taken.arrays) // 4 and saves[1] == saves[2] == saves[3] == saves[0]
    assert cb._buffers.kept._free == {}  # let go at the end of fit


def test_async_save_writes_what_a_synchronous_save_writes(tmp_path):
    def run(directory, async_save):
        LP.seed_everything(3, verbose=False)
        cb = BestCheckpoint(monitor="val_loss", dirpath=directory, top_k=2, snapshots={"every_n_epochs": 2},
                            async_save=async_save)
        fit(LP, cb, 4)
        return cb

    sync_cb, async_cb = run(tmp_path / "sync", False), run(tmp_path / "async", True)
    listing = lambda d: sorted((r["name"], tuple(r["tags"]), r["step"]) for r in manifest(d)["records"])  # noqa: E731
    assert listing(tmp_path / "async") == listing(tmp_path / "sync")
    assert os.path.basename(async_cb.best_model_path) == os.path.basename(sync_cb.best_model_path)
    assert async_cb.last_model_path.endswith(os.path.basename(sync_cb.last_model_path))
    for name, _tags, _step in listing(tmp_path / "sync"):
        a = torch.load(tmp_path / "async" / f"{name}.ckpt", weights_only=False)
        s = torch.load(tmp_path / "sync" / f"{name}.ckpt", weights_only=False)
        assert a["state_dict"].keys() == s["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], s["state_dict"][k]) for k in s["state_dict"])
        assert a["global_step"] == s["global_step"] and a["epoch"] == s["epoch"]
        assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(s["optimizer_states"][0]["state"][0]["exp_avg"])
