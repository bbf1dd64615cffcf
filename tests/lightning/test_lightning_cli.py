"""BestCheckpoint configured the LightningCLI way: class_path and init_args in config.yaml, with a policy file."""

from __future__ import annotations

import lightning.pytorch as LP
import pytest
from lightning.pytorch.cli import LightningCLI

from checkpoint_hooks.lightning import BestCheckpoint
from tests.index import read_index
from tests.lightning.models import TinyLP, loader


class TinyData(LP.LightningDataModule):
    def train_dataloader(self):
        return loader(shuffle=True)

    def val_dataloader(self):
        return loader()


def test_lightning_cli_config_with_policy_file(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("monitor: val_loss\ntop_k: 2\nsnapshots:\n  every_n_epochs: 2\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 3
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: checkpoint_hooks.lightning.BestCheckpoint
      init_args:
        policy: {policy}
        dirpath: {tmp_path / "ckpt"}
        verbose: true
"""
    )
    cli = LightningCLI(TinyLP, TinyData, args=["fit", "--config", str(config)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, BestCheckpoint)]
    assert cli.trainer.checkpoint_callback is callback
    assert (callback.policy.top_k, callback.policy.snapshots.every_n_epochs, callback.policy.verbose) == (2, 2, True)
    manifest = read_index(tmp_path / "ckpt")
    tags = {r["epoch"]: r["tags"] for r in manifest["records"]}
    assert "snapshot" in tags[1] and "last" in tags[2]
    assert sum("best" in t for t in tags.values()) == 2


def test_lightning_cli_init_args_take_policy_fields(tmp_path):
    """Policy fields are parameters of their own: a config sets them in init_args, typed and checked."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  callbacks:
    - class_path: checkpoint_hooks.lightning.BestCheckpoint
      init_args:
        dirpath: {tmp_path / "ckpt"}
        monitor: val_loss
        top_k: 2
        min_delta: 0.001
        format: training_state
        snapshots:
          every_n_epochs: 1
"""
    )
    cli = LightningCLI(TinyLP, TinyData, args=["fit", "--config", str(config)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, BestCheckpoint)]
    p = callback.policy
    assert (p.top_k, p.min_delta, p.format, p.snapshots.every_n_epochs) == (2, 0.001, "training_state", 1)
    manifest = read_index(tmp_path / "ckpt")
    assert sorted(r["epoch"] for r in manifest["records"] if "snapshot" in r["tags"]) == [0, 1]


def test_lightning_cli_help_lists_policy_fields_and_rejects_bad_types(tmp_path, capsys):
    with pytest.raises(SystemExit):
        LightningCLI(TinyLP, TinyData, args=["fit", "--trainer.callbacks.help=checkpoint_hooks.lightning.BestCheckpoint"])
    shown = capsys.readouterr().out
    names = ("top_k", "min_delta", "snapshots", "save_top_k", "resume", "on_save_error")
    assert all(f"--trainer.callbacks.{name} " in shown for name in names), shown
    with pytest.raises(SystemExit):
        LightningCLI(
            TinyLP, TinyData, save_config_callback=None,
            args=["fit", "--trainer.callbacks=checkpoint_hooks.lightning.BestCheckpoint",
                  "--trainer.callbacks.top_k=several"],
        )
    assert "top_k" in capsys.readouterr().err
