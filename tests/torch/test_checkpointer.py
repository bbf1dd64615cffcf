"""checkpoint_hooks.torch.Checkpointer: a hand-written PyTorch loop, real training, real files."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch

from checkpoint_hooks import CheckpointPolicy, PolicyError
from checkpoint_hooks.core import CheckpointDirectory
from checkpoint_hooks.core.resume_state import FORMAT
from checkpoint_hooks.torch import Checkpointer
from tests.torch.train_script import build, digest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(tmp_path: Any, name: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.torch.train_script", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def train(ckpt: Checkpointer, epochs: int, parts: tuple[Any, ...], stop_at: int | None = None) -> list[int]:
    model, optimizer, scheduler, loader, x, y = parts
    seen = []
    for epoch in ckpt.epochs(epochs):
        seen.append(epoch)
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward()
            optimizer.step()
            ckpt.step()
        scheduler.step()
        with torch.no_grad():
            ckpt.epoch_end(val_loss=torch.nn.functional.binary_cross_entropy_with_logits(model(x), y))
        if epoch == stop_at:
            break
    return seen


def test_killed_run_started_again_ends_bit_identical_to_an_uninterrupted_one(tmp_path: Any) -> None:
    _, whole = run_script(tmp_path, "whole", "--dir", str(tmp_path / "a"), "--epochs", "4")
    killed, _ = run_script(tmp_path, "killed", "--dir", str(tmp_path / "b"), "--epochs", "4", "--kill-after-epoch", "1")
    assert killed.returncode == -signal.SIGKILL
    proc, again = run_script(tmp_path, "again", "--dir", str(tmp_path / "b"), "--epochs", "4")
    assert proc.returncode == 0, proc.stderr
    assert again["trained"] == [2, 3]
    assert again["digest"] == whole["digest"]
    assert again["global_step"] == whole["global_step"] == 24


def test_training_state_loads_with_weights_only_and_carries_the_resume_payload(tmp_path: Any) -> None:
    parts = build()
    ckpt = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path), monitor="val_loss")
    train(ckpt, 2, parts)
    state = torch.load(ckpt.last_model_path, weights_only=True)
    assert set(state) == {"model", "optimizer", "scheduler", "checkpoint_hooks"}
    payload = state["checkpoint_hooks"]
    assert payload["format"] == FORMAT and payload["epoch"] == 1 and payload["step"] == 12
    assert {"python", "numpy", "torch"} <= set(payload["rng"][0])
    assert state["scheduler"]["last_epoch"] == 2
    assert torch.equal(state["model"]["0.weight"], parts[0][0].weight.detach())


def test_weights_and_model_formats(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    parts = build()
    weights = Checkpointer(parts[0], parts[1], dirpath=str(tmp_path / "w"), format="weights", last=False)
    train(weights, 1, parts)
    saved = torch.load(weights.best_model_path, weights_only=True)
    assert weights.best_model_path.endswith(".weights.pt") and set(saved) == set(parts[0].state_dict())
    whole = Checkpointer(parts[0], parts[1], dirpath=str(tmp_path / "m"), format="model", last=False)
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        train(whole, 1, parts)
    assert "format='model' pickles the Sequential class" in caplog.text
    module = torch.load(whole.best_model_path, weights_only=False)
    assert isinstance(module, torch.nn.Sequential) and digest(module) == digest(parts[0])
    # a weights/model format has no optimizer state: the rolling last beside it is a training state
    both = Checkpointer(parts[0], parts[1], dirpath=str(tmp_path / "b"), format="weights")
    train(both, 1, parts)
    assert both.last_model_path.endswith(".pt") and not both.last_model_path.endswith(".weights.pt")


def test_top_k_keeps_the_best_by_the_monitor(tmp_path: Any) -> None:
    parts = build()
    model = parts[0]
    ckpt = Checkpointer(model, parts[1], dirpath=str(tmp_path), monitor="val_loss", top_k=2, last=False)
    losses = [0.5, 0.3, 0.4, 0.6, 0.2]
    for epoch in ckpt.epochs(len(losses)):
        ckpt.epoch_end(val_loss=losses[epoch])
    manifest = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert manifest is not None
    kept = sorted(r.epoch for r in manifest.records)
    assert kept == [1, 4]
    assert ckpt.best_model_path.endswith("epoch=004-val_loss=0.2000.pt")
    assert ckpt.best_model_score == pytest.approx(0.2)


def test_a_monitor_never_logged_is_refused_with_the_logged_names(tmp_path: Any) -> None:
    parts = build()
    ckpt = Checkpointer(parts[0], parts[1], dirpath=str(tmp_path), monitor="val_los")
    with pytest.raises(KeyError, match=r"monitor='val_los' is not among the logged metrics \(val_loss\)"):
        for _epoch in ckpt.epochs(2):
            ckpt.epoch_end(val_loss=1.0)
    # the directory was released: another run can take it at once
    again = Checkpointer(parts[0], parts[1], dirpath=str(tmp_path), monitor="val_loss", resume="never")
    assert train(again, 1, parts) == [0]


def test_mid_epoch_checkpoint_restarts_its_epoch_with_a_warning(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    parts = build()
    ckpt = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path), monitor="val_loss", every_n_steps=4)
    train(ckpt, 1, parts)
    manifest = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert manifest is not None
    # steps 4 (mid-epoch, superseded) and 6 (the epoch end's own save); the step-4 last was pruned
    assert [(r.step, r.mid_epoch) for r in manifest.records] == [(6, False)]
    parts = build()
    killed = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path / "k"), every_n_steps=4)
    for _epoch in killed.epochs(2):
        for _ in range(5):
            killed.step()
        break  # leaves the loop in the middle of epoch 0, after the step-4 save
    parts = build()
    resumed = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path / "k"))
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        assert list(resumed.epochs(1)) == [0]
    assert resumed.resumed_from is not None and resumed.resumed_from.step == 4
    assert "PyTorch cannot skip batches, so epoch 0 starts over from its first batch" in caplog.text


def test_sigterm_saves_a_preempted_state_and_ends_the_process_as_sigterm_would(tmp_path: Any) -> None:
    proc, _ = run_script(tmp_path, "term", "--dir", str(tmp_path / "d"), "--epochs", "3", "--sigterm-at-step", "9")
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    manifest = CheckpointDirectory(str(tmp_path / "d")).read_manifest()
    assert manifest is not None
    preempted = [r for r in manifest.records if "preempted" in r.tags]
    assert [(r.epoch, r.step, r.mid_epoch) for r in preempted] == [(1, 10, True)]
    again, result = run_script(tmp_path, "again", "--dir", str(tmp_path / "d"), "--epochs", "3")
    assert again.returncode == 0, again.stderr
    assert result["trained"] == [1, 2]


@pytest.mark.parametrize("guarded", [True, False])
def test_an_exception_saves_a_preempted_state_only_inside_with(tmp_path: Any, guarded: bool) -> None:
    args = ["--dir", str(tmp_path / "d"), "--epochs", "3", "--raise-at-step", "8"] + ([] if guarded else ["--no-with"])
    proc, _ = run_script(tmp_path, "raise", *args)
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
    manifest = CheckpointDirectory(str(tmp_path / "d")).read_manifest()
    assert manifest is not None
    preempted = [(r.step, r.mid_epoch) for r in manifest.records if "preempted" in r.tags]
    assert preempted == ([(8, True)] if guarded else [])
    assert not os.path.exists(tmp_path / "d" / ".lock") or "taking over" not in proc.stderr


def test_resume_never_and_an_explicit_path(tmp_path: Any) -> None:
    parts = build()
    ckpt = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path), monitor="val_loss", top_k=-1)
    train(ckpt, 3, parts)
    manifest = CheckpointDirectory(str(tmp_path)).read_manifest()
    assert manifest is not None
    first = next(r for r in manifest.records if r.epoch == 0)
    parts = build()
    fresh = Checkpointer(parts[0], parts[1], dirpath=str(tmp_path), monitor="val_loss", resume="never")
    assert train(fresh, 3, parts, stop_at=0) == [0]
    parts = build()
    path = os.path.join(str(tmp_path), first.primary_path)
    chosen = Checkpointer(parts[0], parts[1], scheduler=parts[2], dirpath=str(tmp_path), monitor="val_loss", resume=path)
    assert train(chosen, 3, parts) == [1, 2]
    assert chosen.resumed_from is not None and chosen.resumed_from.record is not None
    assert chosen.resumed_from.record.name == first.name
    with pytest.raises(PolicyError, match=r"resume must be 'auto', 'never' or an existing checkpoint; 'nowhere.pt'"):
        list(Checkpointer(parts[0], dirpath=str(tmp_path / "n"), resume="nowhere.pt").epochs(1))


def test_policy_object_and_yaml_are_accepted(tmp_path: Any) -> None:
    (tmp_path / "policy.yaml").write_text(f"dirpath: {tmp_path / 'y'}\nmonitor: val_loss\ntop_k: 2\n")
    parts = build()
    ckpt = Checkpointer.from_yaml(tmp_path / "policy.yaml", parts[0], parts[1], last=False)
    assert ckpt.policy.top_k == 2 and ckpt.policy.last is False
    policy = CheckpointPolicy(dirpath=str(tmp_path / "p"), monitor="val_loss")
    assert Checkpointer(parts[0], policy=policy, top_k=3).policy.top_k == 3
    with pytest.raises(PolicyError, match="unknown field 'topk'"):
        Checkpointer(parts[0], topk=3)


def test_a_model_whose_shapes_changed_gets_one_clear_message(tmp_path: Any) -> None:
    parts = build()
    train(Checkpointer(parts[0], parts[1], dirpath=str(tmp_path)), 1, parts)
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    with pytest.raises(Exception, match=r"could not load .* into this model: '0.weight' is \[16, 8\] in the checkpoint and \[32, 8\] in this model; .*resume='never'"):
        list(Checkpointer(other, dirpath=str(tmp_path)).epochs(2))


DDP_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from checkpoint_hooks.torch import Checkpointer
rank = int(sys.argv[1]); out = sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + sys.argv[4], rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ckpt = Checkpointer(model, opt, dirpath=sys.argv[2], monitor="val_loss")
trained = []
for epoch in ckpt.epochs(int(sys.argv[5])):
    trained.append(epoch)
    for _ in range(3):
        opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); ckpt.step()
    ckpt.epoch_end(val_loss=1.0 / (epoch + 1))
with open(out, "w") as f:
    json.dump({"trained": trained, "best": ckpt.best_model_path, "w": model.module.weight.detach().tolist()}, f)
dist.barrier()  # every rank is done with the others
# leave without tearing gloo down: a rank whose peer closed first can abort in gloo's teardown
sys.stdout.flush()
os._exit(0)
"""


def test_under_ddp_rank_zero_writes_and_every_rank_resumes_the_same_epoch(tmp_path: Any) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)

    def run(epochs: int, tag: str) -> list[dict[str, Any]]:
        rendezvous = tmp_path / f"rdv-{tag}"
        procs = [
            subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "d"), str(tmp_path / f"{tag}{rank}.json"),
                              str(rendezvous), str(epochs)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        return [json.loads((tmp_path / f"{tag}{rank}.json").read_text()) for rank in (0, 1)]

    first = run(2, "a")
    assert [r["trained"] for r in first] == [[0, 1], [0, 1]]
    assert first[0]["best"] and first[1]["best"] == ""  # only rank zero knows the directory's records
    second = run(4, "b")
    assert [r["trained"] for r in second] == [[2, 3], [2, 3]]
    assert second[0]["w"] == second[1]["w"]
    names = sorted(os.listdir(tmp_path / "d"))
    assert not [n for n in names if "rank" in n or n.startswith(".staging")]


def test_when_no_checkpoint_verifies_the_warning_says_training_starts_from_the_beginning(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def run(epochs: int) -> list[int]:
        model = torch.nn.Linear(2, 2)
        ckpt = Checkpointer(model, torch.optim.SGD(model.parameters(), lr=0.1), dirpath=str(tmp_path))
        trained = []
        for epoch in ckpt.epochs(epochs):
            trained.append(epoch)
            ckpt.epoch_end()
        return trained

    assert run(1) == [0]
    [record] = CheckpointDirectory(str(tmp_path)).read_manifest().records  # type: ignore[union-attr]
    path = tmp_path / record.files[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        assert run(2) == [0, 1]
    assert "none of the 1 checkpoint(s) to resume from" in caplog.text
    assert "training starts from the beginning" in caplog.text
