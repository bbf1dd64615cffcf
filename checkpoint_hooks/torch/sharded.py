"""Sharded training states through `torch.distributed.checkpoint` (DCP): every rank writes its own part.

A `sharded` checkpoint is a DCP folder: the shards of the model and optimizer state (taken with
`get_state_dict`, so FSDP2 / DTensor parameters stay sharded), DCP's `.metadata`, and
`checkpoint_hooks.pt`, the resume payload (random states of every rank, scheduler, counters)
that rank zero writes. Each file is hashed on its way to disk by the rank that writes it; rank
zero gathers the sizes and checksums, and the engine publishes and commits the folder as one
checkpoint. `dcp.load` reads it back on any world size.

On a local (or mounted) directory every rank writes into rank zero's staging folder, which must
be on a filesystem every rank sees. On a remote store (s3://, any fsspec URL) every rank writes
into a local folder of its own; rank zero publishes the sidecar that lists every file and its
own files, then the other ranks upload theirs (`core.peer_files`), and rank zero commits once
they all succeeded. Loading reads each rank's part from the store through DCP's fsspec reader.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # fsspec comes with DCP's import
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from checkpoint_hooks.core import durable, hashing, peer_files
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.store import is_url
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


def copy(state: dict[str, Any]) -> dict[str, Any]:
    """`state` copied to host memory, shards and all, for a save in the background while training goes on."""
    return BlockingAsyncStager().stage(state)


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


def save(
    state: dict[str, Any],
    payload: Mapping[str, Any],
    folder: str,
    *,
    sync: bool,
    checksums: bool,
    upload: Callable[[list[str]], None] | None = None,
    group: Any = None,
) -> None:
    """Every rank: write its shards of `state` into `folder`; rank zero also writes `payload` there.

    Returns once every rank's files are on disk (fsynced with `sync`) and, with `checksums`, rank
    zero knows each file's checksum (`hashing.take_written` finds it). An error on any rank raises
    ShardError on every rank, so that no rank goes on as if the save had succeeded.

    With `upload` (a remote store), `folder` is this rank's own local folder. Rank zero announces
    the other ranks' files to its transaction; each other rank waits until rank zero published its
    part, then calls `upload(names)` with the names of its files in `folder`, and the ranks report
    back to rank zero before it commits.

    `group`: the process group of every collective (None: the default one); a background save
    runs its collectives apart from training's.
    """
    rank = dist.get_rank() if _distributed() else 0
    error: str | None = None
    mine: list[tuple[str, str | None, int]] = []
    try:
        # nothing that can fail on one rank alone before DCP's collectives (it creates the folder itself)
        with durable.saving_to_disk(folder) if sync else contextlib.nullcontext():
            with _one_process_quietly():
                dcp_save(state, storage_writer=_Writer(folder), process_group=group, no_dist=not _distributed())
            if rank == 0:
                save_torch(dict(payload), os.path.join(folder, PAYLOAD), checksums)
        if rank != 0 and (checksums or upload is not None):
            mine = _own_files(folder, rank, checksums)
    except CheckpointException as exc:  # a BaseException: DCP raises it on every rank when one failed
        error = failures(exc)
    except Exception as exc:
        error = f"rank {rank}: {exc}"
    reports: list[Any] = [(error, mine)]
    if _distributed():
        reports = [None] * dist.get_world_size(group)
        dist.all_gather_object(reports, (error, mine), group=group)
    errors = list(dict.fromkeys(e for e, _ in reports if e is not None))
    if errors:
        raise ShardError(f"a rank could not write its shards: {'; '.join(errors)}")
    others = [entry for _, files in reports for entry in files]
    if upload is None:
        if rank == 0:
            _remember(folder, others, synced=sync)
    elif rank == 0:
        if len(reports) > 1:
            place, abandon = functools.partial(_place, group), functools.partial(_abandon, group)
            peer_files.expect(folder, peer_files.PeerFiles(others, place=place, abandon=abandon))
    else:
        _upload_when_published(folder, [name for name, _, _ in mine], upload, group)


def _own_files(folder: str, rank: int, checksums: bool) -> list[tuple[str, str | None, int]]:
    """(name, checksum, size) of the shard files this rank wrote, hashed as they were written."""
    found: list[tuple[str, str | None, int]] = []
    for name in sorted(os.listdir(folder)):
        match = _SHARD.match(name)
        if match is None or int(match.group(1)) != rank:
            continue
        path = os.path.join(folder, name)
        if checksums:
            checksum, size = hashing.checksum_file(path)  # as written, else read back
            found.append((name, checksum, size))
        else:
            found.append((name, None, os.path.getsize(path)))
    return found


def _remember(folder: str, entries: list[tuple[str, str | None, int]], synced: bool) -> None:
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
        if checksum is not None:
            hashing.remember_written(path, checksum, size, st, synced=synced)


def _place(group: Any) -> None:
    """On rank zero, once its part is published: the other ranks upload theirs; raises when one failed."""
    box: list[Any] = [True]
    results: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.broadcast_object_list(box, src=0, group=group)
        dist.all_gather_object(results, None, group=group)
    except Exception as exc:  # a rank died or the group broke: another may still be uploading
        raise peer_files.OutcomeUnknown(
            f"could not learn whether every rank uploaded its shards ({exc}); what was uploaded stays until "
            "the next start removes it"
        ) from exc
    errors = [error for error in results if error is not None]
    if errors:
        raise ShardError(f"a rank could not upload its shards: {'; '.join(errors)}")


def _abandon(group: Any) -> None:
    """On rank zero, when its save failed before the other ranks' turn: they upload nothing."""
    box: list[Any] = [False]
    dist.broadcast_object_list(box, src=0, group=group)


def _upload_when_published(folder: str, names: list[str], upload: Callable[[list[str]], None], group: Any) -> None:
    """On the other ranks: wait for rank zero's word, upload this rank's files, and report to it."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    if not box[0]:
        return  # rank zero's save failed before the uploads: the ranks agree on that right after
    error: str | None = None
    try:
        upload(names)
    except Exception as exc:
        error = f"rank {dist.get_rank()}: {exc}"
    dist.all_gather_object([None] * dist.get_world_size(group), error, group=group)
    if error is not None:
        raise ShardError(f"could not upload the shards of {folder}: {error}")


def load(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Every rank: load its part of the sharded checkpoint `folder` into `model` and `optimizer`.

    Returns the payload rank zero wrote beside the shards. The world size may differ from the one
    that saved it: DCP reshards.
    """
    state = training_state(model, optimizer)
    remote = is_url(folder)
    try:
        with _one_process_quietly():
            if remote:  # each rank reads what it needs from the store, nothing else
                dcp_load(state, storage_reader=FsspecReader(folder), no_dist=not _distributed())
            else:
                dcp_load(state, checkpoint_id=folder, no_dist=not _distributed())
        set_state_dict(
            model,
            [optimizer] if optimizer is not None else [],
            model_state_dict=state["model"],
            optim_state_dict=state.get("optimizer", {}),
        )
        payload = _read_payload(folder, remote)
    except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
        reason = failures(exc) if isinstance(exc, CheckpointException) else str(exc)
        raise CheckpointError(
            f"could not load the sharded checkpoint {folder}: {reason}; the model or the optimizer differs "
            "from the one that saved it. Start fresh with resume='never' or another dirpath"
        ) from None
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{folder}/{PAYLOAD} is not a payload of checkpoint_hooks.torch")
    return dict(payload)


def _read_payload(folder: str, remote: bool) -> Any:
    if not remote:
        return torch.load(os.path.join(folder, PAYLOAD), map_location="cpu", weights_only=True)
    import fsspec

    with fsspec.open(f"{folder}/{PAYLOAD}", "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
