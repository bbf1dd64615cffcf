"""Lightning's background saves of accelerator tensors, driven on CPU through the fake device of tests/torch."""

from __future__ import annotations

import lightning.pytorch as LP
import torch

from checkpoint_hooks.lightning import BestCheckpoint
from checkpoint_hooks.torch.io import SnapshotBuffers
from tests.lightning.models import loader, make_module, trainer
from tests.torch.test_device_snapshot import FakeDevice


def test_the_worker_waits_for_the_device_copies_before_it_writes(tmp_path):
    # no room to clone: each tensor is queued into a pinned buffer (zeros until the copy lands at `wait`)
    device = FakeDevice(free=0)
    cb = BestCheckpoint(monitor=None, dirpath=tmp_path, top_k=-1, last=False, async_save=True)
    cb._buffers = SnapshotBuffers(device)
    cb._framework.buffers = cb._buffers.kept
    module = make_module(LP)
    trainer(LP, [cb], 2).fit(module, loader(), loader())
    assert device.count("copy_async", True) > 0 and device.count("wait", False) > 0  # queued here, awaited there
    saved = torch.load(cb.best_model_path, weights_only=False)["state_dict"]  # the final epoch's training state
    for name, value in module.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert any(value.abs().sum() > 0 for value in saved.values())  # not the pinned buffers' zeros
