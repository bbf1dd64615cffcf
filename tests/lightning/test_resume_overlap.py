"""Automatic resume verifies the checkpoint while Lightning loads it, and restores the previous one when it does not verify.

Also: the files BestCheckpoint writes (through a DurableFile, without torch's zip CRC32) load with
torch.load, with Lightning's own fit(ckpt_path=...) and with load_from_checkpoint."""

from __future__ import annotations

import logging
import struct
import zipfile
from dataclasses import replace

import lightning.pytorch as LP
import pytest
import torch

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.hashing import checksum_file
from checkpoint_hooks.lightning import BestCheckpoint
from tests.index import read_index
from tests.lightning.models import TinyLP, loader, make_module, trainer


class Capture(LP.Callback):
    """The weights and the step when training starts: after every restore, before the first step."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.step = trainer.global_step


def fit(cb, epochs, *extra):
    t = trainer(LP, [cb, *extra], epochs)
    t.fit(make_module(LP), loader(), loader())
    return t


def checkpoints_newest_first(dirpath):
    records = sorted(read_index(dirpath)["records"], key=lambda r: -r["seq"])
    return [dirpath / r["files"][0]["path"] for r in records if r["format"] == "training_state"]


def tensor_data_offsets(path):
    """Where each tensor's bytes start in a torch.save zip (local header: 30 bytes + name + extra)."""
    offsets = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset)
                name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
                offsets.append(info.header_offset + 30 + name_length + extra_length)
    return offsets


def flip_tensor_bytes(path):
    """Damage every tensor's first bytes in place: same size, and torch.load still succeeds."""
    with open(path, "r+b") as f:
        for offset in tensor_data_offsets(path):
            f.seek(offset)
            data = f.read(4)
            f.seek(offset)
            f.write(bytes(b ^ 0x5A for b in data))


def weights_of(path):
    return torch.load(path, weights_only=False)["state_dict"]


def assert_weights(captured, expected):
    assert captured.keys() == expected.keys()
    for key in expected:
        assert torch.equal(captured[key], expected[key]), key


def test_flipped_bytes_that_still_load_fall_back_to_the_previous_checkpoint(tmp_path, caplog):
    fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1), 3)
    newest, previous = checkpoints_newest_first(tmp_path)[:2]
    expected = weights_of(previous)
    flip_tensor_bytes(newest)
    damaged = weights_of(newest)  # torch.load takes the damaged file without complaint
    assert any(not torch.equal(damaged[k], expected[k]) for k in expected)

    caplog.set_level(logging.INFO, "checkpoint_hooks")
    capture = Capture()
    t = fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1, verbose=True), 4, capture)
    assert f"skipping checkpoint {newest} for resume: " in caplog.text and "checksum mismatch" in caplog.text
    assert capture.step == 8  # epoch 1's end: 4 batches an epoch
    assert_weights(capture.weights, expected)
    assert t.global_step == 16
    # the damaged record left the index, and retention went on from epoch 1
    assert sorted(r["epoch"] for r in read_index(tmp_path)["records"]) == [0, 1, 2, 3]
    assert CheckpointDirectory(str(tmp_path)).verify() == []


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1), 3)
    newest, previous = checkpoints_newest_first(tmp_path)[:2]
    expected = weights_of(previous)
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    with pytest.raises(Exception):  # whatever torch raises for half a zip
        torch.load(newest, weights_only=False)

    capture = Capture()
    t = fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1), 4, capture)
    assert f"skipping checkpoint {newest} for resume: " in caplog.text and "truncated" in caplog.text
    assert capture.step == 8
    assert_weights(capture.weights, expected)
    assert t.global_step == 16


def test_two_bad_checkpoints_in_a_row_fall_back_twice(tmp_path, caplog):
    fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1), 3)
    newest, middle, oldest = checkpoints_newest_first(tmp_path)[:3]
    flip_tensor_bytes(newest)
    middle.unlink()
    capture = Capture()
    fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1), 3, capture)
    assert caplog.text.count("skipping checkpoint") == 2 and "missing" in caplog.text
    assert capture.step == 4
    assert_weights(capture.weights, weights_of(oldest))


def test_a_checkpoint_that_verifies_but_does_not_load_is_an_error_not_a_fallback(tmp_path):
    fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1), 2)
    newest = checkpoints_newest_first(tmp_path)[0]
    torch.save({"not": "a lightning checkpoint"}, newest)
    directory = CheckpointDirectory(str(tmp_path))  # record the new bytes: the file verifies
    manifest = directory.read_manifest()
    record = next(r for r in manifest.records if str(newest).endswith(r.primary_path))
    checksum, size = checksum_file(str(newest))
    fixed = replace(record, files=(replace(record.files[0], bytes=size, checksum=checksum), *record.files[1:]))
    manifest.records = [fixed if r is record else r for r in manifest.records]
    directory.commit(manifest)
    assert directory.verify() == []
    with pytest.raises(KeyError):
        fit(BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=-1), 3)


def test_files_without_torchs_crc_load_in_torch_and_lightning(tmp_path):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path / "ours", top_k=1)
    fit(cb, 2)
    path = cb.last_model_path
    with zipfile.ZipFile(path) as archive:  # the records carry no CRC32: our checksum covers the file
        assert {info.CRC for info in archive.infolist() if "/data/" in info.filename} == {0}
    assert CheckpointDirectory(str(tmp_path / "ours")).verify() == []
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 8
    TinyLP.load_from_checkpoint(path)
    # Lightning's own resume from the file
    native = LP.callbacks.ModelCheckpoint(dirpath=tmp_path / "native")
    t = trainer(LP, [native], 3)
    t.fit(make_module(LP), loader(), loader(), ckpt_path=path)
    assert t.global_step == 12
    # weights and the background writer go the same way
    for kw in ({"save_weights_only": True}, {"async_save": True}):
        other = BestCheckpoint(monitor="val_loss", dirpath=tmp_path / str(sorted(kw)), top_k=1, **kw)
        fit(other, 1)
        loaded = torch.load(other.last_model_path if "async_save" in kw else other.best_model_path, weights_only=True)
        assert loaded


def test_without_verify_torch_keeps_its_crc(tmp_path):
    cb = BestCheckpoint(monitor="val_loss", dirpath=tmp_path, top_k=1, verify=False)
    fit(cb, 1)
    with zipfile.ZipFile(cb.last_model_path) as archive:
        assert archive.testzip() is None  # every CRC32 present and right
    assert torch.serialization.get_crc32_options() is True  # restored after the save
