"""The checkpoint-hooks command on real directories, run as a user runs it (a subprocess) where it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.cli import main
from checkpoint_hooks.core import Engine

EXT = {"training_state": ".ckpt"}


def make_dir(path, values, **kw):
    kw.setdefault("monitor", "val_loss")
    engine = Engine(CheckpointPolicy(dirpath=str(path), **kw), extensions=EXT)
    engine.start()
    for epoch, v in enumerate(values):
        engine.save(epoch, epoch * 10, {"val_loss": v}, lambda item, p: open(p, "wb").write(os.urandom(64)))
    engine.close()
    return engine


def run_cli(*args, timeout=60):
    proc = subprocess.run(
        [sys.executable, "-m", "checkpoint_hooks.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_ls_json_lists_manifest_records_with_relative_paths(tmp_path):
    make_dir(tmp_path, [0.5, 0.3, 0.4], top_k=2)
    code, out, _ = run_cli("ls", str(tmp_path), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["epoch"], r["tags"]) for r in rows] == [(1, ["best"]), (2, ["best", "last"])]
    assert rows[0]["path"] == "epoch=001-val_loss=0.3000.ckpt"
    assert {"step", "metrics", "format", "files", "bytes", "created"} <= set(rows[0])


def test_ls_table(tmp_path, capsys):
    make_dir(tmp_path, [0.5, 0.3], top_k=1)
    assert main(["ls", str(tmp_path), "--verify"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0][0] == str(tmp_path) and lines[0][1:] == ["(1", "checkpoint(s))"]
    assert lines[1] == ["epoch", "step", "val_loss", "tags", "size", "age", "verified", "path"]
    assert all(set(cell) == {"-"} for cell in lines[2])  # piped: plain text, a rule under the header
    row = lines[3]
    assert row[:4] == ["1", "10", "0.3000", "best,last"] and row[-2:] == ["yes", "epoch=001-val_loss=0.3000.ckpt"]


def test_best_prints_the_best_path(tmp_path):
    make_dir(tmp_path, [0.5, 0.2, 0.4], top_k=2)
    code, out, _ = run_cli("best", str(tmp_path))
    assert (code, out.strip()) == (0, str(tmp_path / "epoch=001-val_loss=0.2000.ckpt"))


def test_best_without_a_best(tmp_path):
    make_dir(tmp_path, [0.5], top_k=0)
    assert run_cli("best", str(tmp_path))[0] == 1


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_verify_reports_damage(tmp_path, damage):
    make_dir(tmp_path, [0.5, 0.4], top_k=2)
    target = tmp_path / "epoch=001-val_loss=0.4000.ckpt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "bitflip":
        data = bytearray(target.read_bytes())
        data[5] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    code, out, err = run_cli("verify", str(tmp_path))
    assert code == 1
    assert f"BAD {target}" in out
    assert {"truncate": "truncated", "bitflip": "checksum mismatch", "delete": "missing"}[damage] in out
    assert "1 of 2 file(s) do not verify" in err


def test_verify_ok(tmp_path):
    make_dir(tmp_path, [0.5, 0.4], top_k=2)
    code, out, _ = run_cli("verify", str(tmp_path))
    assert code == 0 and "ok: 2 file(s) of 2 checkpoint(s) verify" in out


def test_repair_rebuilds_a_corrupt_manifest_and_keeps_the_old_one(tmp_path):
    make_dir(tmp_path, [0.5, 0.4, 0.3], top_k=2)
    (tmp_path / "manifest.json").write_text("{ not json")
    code, _, err = run_cli("verify", str(tmp_path))
    assert code == 3 and "is corrupt" in err
    code, out, _ = run_cli("verify", "--repair", str(tmp_path))
    assert code == 0 and "rebuilt" in out and "with 2 checkpoint(s)" in out
    assert any(name.startswith("manifest.json.corrupt-") for name in os.listdir(tmp_path))
    assert run_cli("verify", str(tmp_path))[0] == 0


def test_prune_dry_run_then_for_real(tmp_path):
    make_dir(tmp_path, [0.5, 0.4, 0.3, 0.2], top_k=-1)
    policy = tmp_path.parent / f"{tmp_path.name}-policy.yaml"
    policy.write_text("monitor: val_loss\ntop_k: 1\nlast: true\n")
    code, out, _ = run_cli("prune", str(tmp_path), "--policy", str(policy), "--dry-run")
    assert code == 0 and "would delete 3 of 4 checkpoint(s)" in out
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".ckpt")]) == 4
    code, out, _ = run_cli("prune", str(tmp_path), "--policy", str(policy))
    assert code == 0 and "deleted 3 of 4" in out
    assert [n for n in os.listdir(tmp_path) if n.endswith(".ckpt")] == ["epoch=003-val_loss=0.2000.ckpt"]
    assert run_cli("verify", str(tmp_path))[0] == 0


def test_policy_check_and_schema(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("monitor: val_acc\ntop_k: 3\n")
    code, out, _ = run_cli("policy", "check", str(good))
    assert code == 0 and "mode=max" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("monitor: val_acc\ntopk: 3\n")
    code, _, err = run_cli("policy", "check", str(bad))
    assert code == 2 and f"{bad}:2: unknown field 'topk'; did you mean 'top_k'?" in err
    assert "Traceback" not in err
    code, out, _ = run_cli("policy", "schema")
    assert code == 0 and json.loads(out)["properties"]["top_k"]["type"] == "integer"


def test_not_a_checkpoint_directory(tmp_path):
    code, _, err = run_cli("ls", str(tmp_path))
    assert code == 3 and "manifest.json' not found" in err and "Traceback" not in err


def test_repair_refuses_a_folder_that_is_not_a_checkpoint_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["verify", "--repair", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: {str(tmp_path)!r} is not a checkpoint directory") and "--force" in err
    assert len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing written
    assert main(["verify", "--repair", "--force", str(tmp_path)]) == 0
    assert "with 0 checkpoint(s)" in capsys.readouterr().out and (tmp_path / "manifest.json").is_file()


def test_repair_of_a_lost_index_needs_no_force(tmp_path, capsys):
    make_dir(tmp_path, [0.5, 0.4], top_k=2)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.head").unlink(missing_ok=True)
    assert main(["verify", "--repair", str(tmp_path)]) == 0  # the sidecars make it a checkpoint directory
    assert "with 2 checkpoint(s)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["ls", "best", "verify", "prune", "plot"])
def test_every_dir_argument_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert "checkpoint directory: local path or fsspec URL" in " ".join(capsys.readouterr().out.split())


def test_verify_help_documents_force(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    assert "--force" in capsys.readouterr().out


def test_cli_imports_no_framework():
    code = "import sys, checkpoint_hooks.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','tensorflow','keras','paddle','lightning','pytorch_lightning')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plot_draws_every_epoch_including_pruned_ones(tmp_path):
    from checkpoint_hooks.core.directory import CheckpointDirectory
    from checkpoint_hooks.plot import series

    make_dir(tmp_path / "run", [0.5, 0.3, 0.4, 0.2, 0.6], top_k=1)
    manifest = CheckpointDirectory(str(tmp_path / "run")).read_manifest()
    run = manifest.records[0].run
    assert series(manifest, run, "val_loss") == ([0, 1, 2, 3, 4], [0.5, 0.3, 0.4, 0.2, 0.6])
    assert len(manifest.records) == 2  # the history outlives the pruned checkpoints
    out = tmp_path / "m.png"
    code, stdout, _ = run_cli("plot", str(tmp_path / "run"), "-o", str(out))
    assert code == 0 and stdout.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_a_monitor_asks_for_one(tmp_path):
    make_dir(tmp_path / "run", [0.5], monitor=None)
    code, _, err = run_cli("plot", str(tmp_path / "run"), "-o", str(tmp_path / "m.png"))
    assert code == 2 and "--metric" in err


def test_plot_of_a_metric_without_values_writes_nothing(tmp_path, capsys):
    make_dir(tmp_path / "run", [0.5, 0.4])
    out = tmp_path / "m.png"
    assert main(["plot", str(tmp_path / "run"), "--metric", "val_acc", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no values of 'val_acc'" in err and "Metrics with values: val_loss" in err
    assert not out.exists()


def test_repair_on_the_parent_of_a_checkpoint_directory_writes_nothing(tmp_path):
    make_dir(tmp_path / "run", [0.5, 0.4], top_k=1)
    code, _, err = run_cli("verify", "--repair", str(tmp_path))
    assert code == 3 and "nothing was written" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["run"]
