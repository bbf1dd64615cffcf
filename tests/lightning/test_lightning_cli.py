"""BestCheckpoint configured the LightningCLI way: class_path and init_args in config.yaml, with a policy file."""

from __future__ import annotations

import json

import lightning.pytorch as LP
from lightning.pytorch.cli import LightningCLI

from checkpoint_hooks.lightning import BestCheckpoint
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
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    tags = {r["epoch"]: r["tags"] for r in manifest["records"]}
    assert "snapshot" in tags[1] and "last" in tags[2]
    assert sum("best" in t for t in tags.values()) == 2
