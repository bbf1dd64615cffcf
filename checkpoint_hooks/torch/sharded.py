"""Sharded training states through `torch.distributed.checkpoint` (DCP): every rank writes its own part.

A `sharded` checkpoint is a DCP folder: the shards of the model and optimizer state (taken with
`get_state_dict`, so FSDP2 / DTensor parameters stay sharded), DCP's `.metadata`, and
`checkpoint_hooks.pt`, the resume payload (random states of every rank, scheduler, counters)
that rank zero writes. Every rank writes into rank zero's staging folder, which must be on a
filesystem every rank sees. Each file is hashed on its way to disk by the rank that writes it;
rank zero gathers the sizes and checksums, and the engine publishes and commits the folder as
one checkpoint. `dcp.load` reads it back on any world size.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from checkpoint_hooks.core import durable, hashing
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.torch.io import save_torch

PAYLOAD = "checkpoint_hooks.pt"  # beside the shards: what a training state holds besides model and optimizer
_SHARD = re.compile(r"__(\d+)_")  # DCP's data files: __{rank}_{n}.distcp


class ShardError(OSError):
    """A rank could not write its part of a sharded checkpoint (the save fails on every rank)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model and optimizer state as DCP saves and loads them: each rank's shards, keyed by parameter names."""
    model_state, optimizer_state = get_state_dict(model, [optimizer] if optimizer is not None else [])
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer_state
    return state


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem, whose files are hashed (and fsynced, when asked) as they are written."""

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with durable.DurableFile(path) as stream:
            yield stream


class _Writer(FileSystemWriter):
    def __init__(self, path: str) -> None:
        # sync_files=False: a DurableFile fsyncs inside a saving_to_disk block; DCP's own fsync would bypass its hash
        super().__init__(path, sync_files=False)
        self.fs = _HashingFileSystem()


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it saves or loads in a single process when torch.distributed is not initialized."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def failures(exc: CheckpointException) -> str:
    """What failed on which rank, in one line."""
    found = getattr(exc, "failures", None) or {}
    parts = [f"rank {rank}: {getattr(error, 'exc', error)}" for rank, error in sorted(found.items())]
    return "; ".join(parts) or str(exc)


def save(state: dict[str, Any], payload: Mapping[str, Any], folder: str, *, sync: bool, checksums: bool) -> None:
    """Every rank: write its shards of `state` into `folder`; rank zero also writes `payload` there.

    Returns once every rank's files are on disk (fsynced with `sync`) and, with `checksums`, rank
    zero knows each file's checksum (`hashing.take_written` finds it). An error on any rank raises
    ShardError on every rank, so that no rank goes on as if the save had succeeded.
    """
    rank = dist.get_rank() if _distributed() else 0
    error: str | None = None
    mine: list[tuple[str, str, int]] = []
    try:
        # nothing that can fail on one rank alone before DCP's collectives (it creates the folder itself)
        with durable.saving_to_disk(folder) if sync else contextlib.nullcontext():
            with _one_process_quietly():
                dcp_save(state, storage_writer=_Writer(folder), no_dist=not _distributed())
            if rank == 0:
                save_torch(dict(payload), os.path.join(folder, PAYLOAD), checksums)
        if checksums and rank != 0:
            mine = _own_checksums(folder, rank)
    except CheckpointException as exc:  # a BaseException: DCP raises it on every rank when one failed
        error = failures(exc)
    except Exception as exc:
        error = f"rank {rank}: {exc}"
    reports: list[Any] = [(error, mine)]
    if _distributed():
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (error, mine))
    errors = list(dict.fromkeys(e for e, _ in reports if e is not None))
    if errors:
        raise ShardError(f"a rank could not write its shards: {'; '.join(errors)}")
    if rank == 0:
        _remember(folder, [entry for _, files in reports for entry in files], synced=sync)


def _own_checksums(folder: str, rank: int) -> list[tuple[str, str, int]]:
    """(name, checksum, size) of the shard files this rank wrote, hashed as they were written."""
    found = []
    for name in sorted(os.listdir(folder)):
        match = _SHARD.match(name)
        if match is None or int(match.group(1)) != rank:
            continue
        checksum, size = hashing.checksum_file(os.path.join(folder, name))  # as written, else read back
        found.append((name, checksum, size))
    return found


def _remember(folder: str, entries: list[tuple[str, str, int]], synced: bool) -> None:
    """On rank zero: keep the other ranks' checksums for the engine; each file must be here."""
    for name, checksum, size in entries:
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ShardError(
                f"{name}, written by another rank, is not in {folder}: dirpath must be a filesystem every rank shares"
            ) from None
        if st.st_size != size:
            raise ShardError(f"{name} holds {st.st_size} bytes here; the rank that wrote it wrote {size}")
        hashing.remember_written(path, checksum, size, st, synced=synced)


def load(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Every rank: load its part of the sharded checkpoint `folder` into `model` and `optimizer`.

    Returns the payload rank zero wrote beside the shards. The world size may differ from the one
    that saved it: DCP reshards.
    """
    state = training_state(model, optimizer)
    try:
        with _one_process_quietly():
            dcp_load(state, checkpoint_id=folder, no_dist=not _distributed())
        set_state_dict(
            model,
            [optimizer] if optimizer is not None else [],
            model_state_dict=state["model"],
            optim_state_dict=state.get("optimizer", {}),
        )
        payload = torch.load(os.path.join(folder, PAYLOAD), map_location="cpu", weights_only=True)
    except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
        reason = failures(exc) if isinstance(exc, CheckpointException) else str(exc)
        raise CheckpointError(
            f"could not load the sharded checkpoint {folder}: {reason}; the model or the optimizer differs "
            "from the one that saved it. Start fresh with resume='never' or another dirpath"
        ) from None
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{os.path.join(folder, PAYLOAD)} is not a payload of checkpoint_hooks.torch")
    return dict(payload)
