"""A Lightning fit with ModelParallelStrategy (FSDP2 over 2 CPU processes, gloo) and BestCheckpoint.

    python -m tests.lightning.model_parallel_script --dir D --epochs N --out PREFIX

Every rank writes PREFIX{rank}.json: the epochs it trained, the global step, best_model_path, and a
digest of its own shard of the parameters when the fit starts training and when it ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from checkpoint_hooks.lightning import BestCheckpoint
from tests.lightning.models import loader


class Sharded(L.LightningModule):
    """A small MLP with dropout whose layers `configure_model` shards with FSDP2 over the strategy's mesh."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"] if "data_parallel" in (self.device_mesh.mesh_dim_names or ()) else self.device_mesh
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> dict[str, object]:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)}


def local_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        h.update(local.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-last", action="store_true", help="only ModelCheckpoint's arguments, with save_last=True")
    args = parser.parse_args()
    L.seed_everything(7, verbose=False)
    report: dict[str, object] = {"trained": []}

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            report["start"] = local_digest(trainer.strategy.model)

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            report["trained"].append(trainer.current_epoch)  # type: ignore[union-attr]

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            report["end"] = local_digest(trainer.strategy.model)

    if args.save_last:
        checkpoint = BestCheckpoint(monitor="val_loss", dirpath=args.dir, save_top_k=2, save_last=True)
    else:
        checkpoint = BestCheckpoint(monitor="val_loss", dirpath=args.dir, top_k=2)
    trainer = L.Trainer(
        max_epochs=args.epochs, callbacks=[Record(), checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    )
    trainer.fit(Sharded(), loader(shuffle=True), loader())
    report.update(global_step=trainer.global_step, best=checkpoint.best_model_path, rank=trainer.global_rank,
                  last=checkpoint.last_model_path)
    with open(f"{args.out}{trainer.global_rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
