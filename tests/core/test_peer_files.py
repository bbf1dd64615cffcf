"""Files of a checkpoint that other ranks upload themselves (core.peer_files): recorded, placed after the
writer's part is published and before the commit, and taken back with a failed save."""

from __future__ import annotations

import os
from typing import Any

import pytest

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine, SaveError
from checkpoint_hooks.core import peer_files as peer_files_module
from checkpoint_hooks.core.hashing import checksum_file
from checkpoint_hooks.core.manifest import sidecar_name
from checkpoint_hooks.core.peer_files import OutcomeUnknown, PeerFiles

EXT = {"training_state": ".ckpt", "sharded": ".dcp"}
PEER = b"the other rank's shard"


class Peer:
    """A stand-in for the other ranks: it uploads its file into the store when placed, and notes what it saw."""

    def __init__(self, engine: Engine, tmp: str, fail: BaseException | None = None) -> None:
        self.engine, self.fail = engine, fail
        self.source = os.path.join(tmp, "__1_0.distcp")
        with open(self.source, "wb") as f:
            f.write(PEER)
        self.checksum, self.size = checksum_file(self.source)
        self.calls: list[str] = []
        self.seen: dict[str, Any] = {}

    def write(self, item: Any, path: str) -> None:
        """The writer's part of the item, and the announcement of the peer's."""
        self.item = item
        os.mkdir(path)
        with open(os.path.join(path, ".metadata"), "wb") as f:
            f.write(b"metadata")
        peer_files_module.expect(path, PeerFiles([("__1_0.distcp", self.checksum, self.size)], self.place, self.abandon))

    def place(self) -> None:
        self.calls.append("place")
        store, folder = self.engine.store, self.item.filename
        assert store is not None
        self.seen = {
            "sidecar": store.exists(sidecar_name(self.item.name)),
            "own": store.exists(f"{folder}/.metadata"),
            "committed": self.engine.manifest.by_name(self.item.name) is not None,
        }
        with open(self.source, "rb") as f:
            store.write_bytes(f"{folder}/__1_0.distcp", f.read())
        if self.fail is not None:
            raise self.fail

    def abandon(self) -> None:
        self.calls.append("abandon")


@pytest.fixture
def engine(tmp_path: Any) -> Engine:
    policy = CheckpointPolicy(dirpath=str(tmp_path / "d"), monitor="loss", format="sharded")
    e = Engine(policy, extensions=EXT, resumable_formats=frozenset(EXT))
    e.start()
    return e


def test_the_peers_place_their_files_after_the_writers_part_is_published_and_before_the_commit(
    engine: Engine, tmp_path: Any
) -> None:
    peer = Peer(engine, str(tmp_path))
    [record] = engine.save(0, 0, {"loss": 0.5}, peer.write)
    assert peer.calls == ["place"]
    assert peer.seen == {"sidecar": True, "own": True, "committed": False}
    folder = "epoch=000-loss=0.5000.dcp"
    assert record.folder == folder
    assert [(f.path, f.bytes) for f in record.files] == [(f"{folder}/.metadata", 8), (f"{folder}/__1_0.distcp", len(PEER))]
    assert engine.manifest.by_name(record.name) is not None
    assert engine.directory.verify_record(record) == []  # the peer's checksum is the one recorded
    engine.close()


def test_a_failed_placement_fails_the_save_and_takes_back_every_file(engine: Engine, tmp_path: Any) -> None:
    peer = Peer(engine, str(tmp_path), fail=ConnectionError("lost the connection after the upload"))
    with pytest.raises(SaveError, match="lost the connection after the upload"):
        engine.save(0, 0, {"loss": 0.5}, peer.write)
    assert peer.calls == ["place"]
    assert engine.manifest.records == []
    assert engine.store is not None
    assert [f for f in engine.store.list_files() if ".dcp" in f or f.endswith(".meta.json")] == []  # the peer's too
    engine.close()


def test_a_save_that_fails_before_the_peers_turn_abandons_them(engine: Engine, tmp_path: Any) -> None:
    peer = Peer(engine, str(tmp_path))

    def write_then_fail(item: Any, path: str) -> None:
        peer.write(item, path)
        raise OSError(28, "No space left on device")

    with pytest.raises(SaveError, match="No space left on device"):
        engine.save(0, 0, {"loss": 0.5}, write_then_fail)
    assert peer.calls == ["abandon"]  # once: the peers wait for exactly one answer
    assert engine.manifest.records == []
    engine.close()


def test_when_the_peers_outcome_is_unknown_what_was_published_stays_for_the_next_start(tmp_path: Any) -> None:
    """A rank that died mid-upload: another may still be uploading, so nothing the sidecar lists is deleted now."""
    policy = CheckpointPolicy(dirpath=str(tmp_path / "d"), monitor="loss", format="sharded")
    engine = Engine(policy, extensions=EXT, resumable_formats=frozenset(EXT))
    engine.start()
    peer = Peer(engine, str(tmp_path), fail=OutcomeUnknown("a rank died"))
    with pytest.raises(SaveError, match="a rank died"):
        engine.save(0, 0, {"loss": 0.5}, peer.write)
    assert engine.manifest.records == []
    store = engine.store
    assert store is not None
    left = [f for f in store.list_files() if ".dcp" in f or f.endswith(".meta.json")]
    assert sorted(f.rsplit("/", 1)[-1] for f in left) == [".metadata", "__1_0.distcp", "epoch=000-loss=0.5000.meta.json"]
    engine.close()
    again = Engine(policy, extensions=EXT, resumable_formats=frozenset(EXT))
    again.start()  # its cleanup finds them through the sidecar
    again.close()
    assert [f for f in store.list_files() if ".dcp" in f or f.endswith(".meta.json")] == []
