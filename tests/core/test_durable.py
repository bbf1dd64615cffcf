"""Checksums computed while writing, early writeback and the fsync beside the hash, on real temp directories.

Whatever a writer does, the checksum the engine records must be that of the bytes finally on disk."""

from __future__ import annotations

import errno
import os
import stat
import time
import zipfile

import pytest
import xxhash

from checkpoint_hooks import CheckpointPolicy
from checkpoint_hooks.core import Engine, SaveError, durable, hashing

EXT = {"training_state": ".ckpt"}
MiB = 1024 * 1024


def engine(tmp_path, **kw):
    e = Engine(CheckpointPolicy(dirpath=str(tmp_path / "ckpt"), top_k=-1, last=False, **kw), extensions=EXT)
    e.start()
    return e


def payload(size: int, seed: int = 0) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[seed : seed + size]


def on_disk(e, record):
    """The checksum of the record's primary file as it is on disk, read back."""
    with open(e.path_of(record), "rb") as f:
        return hashing.checksum_stream(f)[0]


def in_order(*chunks: bytes) -> str:
    """What a hash of the bytes in the order they were written gives (wrong once a writer patched them)."""
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return f"xxh3_128:{h.hexdigest()}"


@pytest.fixture
def reads(monkeypatch):
    """Counts the files `checksum_file` reads back."""
    count = []
    original = hashing.checksum_stream

    def counted(stream, *a, **kw):
        count.append(getattr(stream, "name", stream))
        return original(stream, *a, **kw)

    monkeypatch.setattr(hashing, "checksum_stream", counted)
    return count


def test_a_durable_file_is_hashed_as_written_and_not_read_back(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(durable, "WRITEBACK_STEP", 4 * MiB)  # several chunks and writebacks per large write
    small = [payload(100, i) for i in range(50)]
    big = payload(9 * MiB + 7)

    def write(item, path):
        with durable.DurableFile(path) as f:
            for chunk in small[:25]:
                f.write(chunk)
            f.write(memoryview(big))  # hashed on the helper thread while written
            for chunk in small[25:]:
                f.write(chunk)
            assert f.tell() == sum(map(len, small)) + len(big)

    e = engine(tmp_path)
    (record,) = e.save(0, 1, {}, write)
    assert reads == []  # the checksum came from the write
    assert record.files[0].checksum == on_disk(e, record) == in_order(*small[:25], big, *small[25:])
    assert record.files[0].bytes == os.path.getsize(e.path_of(record))
    assert e.directory.verify() == []
    e.close()


# Each writer ends with header + body on disk and returns what a reader following the file's growth saw.


def _seek_back(f, header, body):
    f.write(b"\0" * len(header))
    f.write(body)
    f.seek(0)
    f.write(header)
    return [b"\0" * len(header), body]


def _through_fileno(f, header, body):
    f.write(b"\0" * len(header) + body)
    os.pwrite(f.fileno(), header, 0)
    return [b"\0" * len(header), body]


def _truncate(f, header, body):
    f.write(header + body + b"tail to cut")
    f.truncate(len(header) + len(body))
    return [header, body, b"tail to cut"]


PATCHES = {"seek back": _seek_back, "fileno": _through_fileno, "truncate": _truncate}


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_a_writer_that_patches_through_the_file_gets_the_checksum_of_the_final_bytes(tmp_path, reads, patch, large):
    header, body = b"HEADER-v2", payload(6 * MiB if large else 3000)

    followed = []

    def write(item, path):
        with durable.DurableFile(path) as f:
            followed.extend(PATCHES[patch](f, header, body))

    e = engine(tmp_path)
    (record,) = e.save(0, 1, {}, write)
    with open(e.path_of(record), "rb") as f:
        assert f.read() == header + body
    assert len(reads) == 1  # read back
    assert record.files[0].checksum == on_disk(e, record) == in_order(header, body)
    assert record.files[0].checksum != in_order(*followed)  # what hashing the writes as they come gives
    e.close()


@pytest.mark.parametrize("how", ["rewritten in place", "replaced"])
def test_a_file_changed_after_its_durable_file_closed_is_read_back_and_fsynced(tmp_path, reads, fsyncs, how):
    body = payload(5 * MiB)

    def write(item, path):
        with durable.DurableFile(path) as f:
            f.write(b"draft" + body)
        time.sleep(0.02)  # past the timestamp tick of kernels without fine-grained change times
        if how == "rewritten in place":
            with open(path, "r+b") as f:  # same size, same inode
                f.write(b"final")
        else:
            with open(path + ".tmp", "wb") as f:
                f.write(b"final" + body)
            os.replace(path + ".tmp", path)

    e = engine(tmp_path)
    (record,) = e.save(0, 1, {}, write)
    assert len(reads) == 1
    assert record.files[0].checksum == on_disk(e, record) == in_order(b"final", body)
    final = os.stat(e.path_of(record))
    assert (final.st_ino, final.st_mtime_ns, False) in fsyncs  # fsynced again as it finally is
    e.close()


def test_a_durable_file_renamed_after_writing_keeps_its_checksum(tmp_path, reads):
    """Saves written ahead into one staging folder are moved into another before they are hashed."""
    body = payload(5 * MiB)
    with durable.DurableFile(tmp_path / "written") as f:
        f.write(body)
    os.replace(tmp_path / "written", tmp_path / "moved")
    assert hashing.checksum_file(str(tmp_path / "moved")) == (in_order(body), len(body))
    assert reads == []
    assert hashing.checksum_file(str(tmp_path / "moved")) == (in_order(body), len(body))  # taken once
    assert len(reads) == 1


@pytest.mark.parametrize("through", ["DurableFile", "open"])
def test_zipfile_patching_its_headers_gets_the_checksum_of_the_final_bytes(tmp_path, through):
    """Python's zipfile (Keras .keras files) seeks back to fill in each member's sizes and CRC."""

    def write(item, path):
        target = durable.DurableFile(path) if through == "DurableFile" else open(path, "wb")
        with target as f, zipfile.ZipFile(f, "w") as z:
            z.writestr("config.json", b"{}" * 1000)
            with z.open("weights.bin", "w") as member:
                member.write(payload(2 * MiB))

    e = engine(tmp_path)
    (record,) = e.save(0, 1, {}, write)
    assert record.files[0].checksum == on_disk(e, record)
    assert zipfile.ZipFile(e.path_of(record)).testzip() is None
    e.close()


def test_a_plain_writer_that_seeks_back_is_read_back_while_fsynced(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(durable, "SYNC_AHEAD_MIN", 1 * MiB)  # take the fsync-beside-the-hash path
    header, body = b"SIZE=00000", payload(3 * MiB)

    def write(item, path):
        with open(path, "wb") as f:
            f.write(b"SIZE=?????")
            f.write(body)
            f.seek(0)
            f.write(header)

    e = engine(tmp_path)
    (record,) = e.save(0, 1, {}, write)
    assert len(reads) == 1
    assert record.files[0].checksum == on_disk(e, record) == in_order(header, body)
    e.close()


def test_an_fsync_error_beside_the_hash_fails_the_save(tmp_path, monkeypatch):
    """A second fsync need not see an error a first one reported: the helper's error must surface."""
    monkeypatch.setattr(durable, "SYNC_AHEAD_MIN", 1 * MiB)
    real_fsync = os.fsync
    failed = []

    def fsync_once_failing(fd):
        if not failed and os.fstat(fd).st_size >= MiB:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    e = engine(tmp_path)
    monkeypatch.setattr(os, "fsync", fsync_once_failing)
    with pytest.raises(SaveError, match="Input/output error"):
        e.save(0, 1, {}, lambda item, path: open(path, "wb").write(payload(2 * MiB)))
    assert failed and e.manifest.records == []
    assert not [n for n in os.listdir(tmp_path / "ckpt") if n.endswith(".ckpt")]
    e.close()


def test_checksums_of_failed_or_unverified_saves_are_not_kept(tmp_path):
    def fails(item, path):
        with durable.DurableFile(path) as f:
            f.write(payload(1000))
        raise RuntimeError("the framework failed after writing")

    e = engine(tmp_path)
    with pytest.raises(SaveError, match="the framework failed"):
        e.save(0, 1, {}, fails)
    e.close()
    e = engine(tmp_path / "unverified", verify=False)
    (record,) = e.save(0, 1, {}, lambda item, path: durable.DurableFile(path).close())
    assert record.files[0].checksum is None
    e.close()
    assert not [w for w in hashing._written.values() if str(tmp_path) in w.path]

    with pytest.raises(ValueError, match="boom"), durable.DurableFile(tmp_path / "raised") as f:
        f.write(b"partial")
        raise ValueError("boom")
    assert not [w for w in hashing._written.values() if w.path == str(tmp_path / "raised")]  # it raised: none kept


def test_durable_file_starts_writeback_of_what_it_wrote(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(durable, "WRITEBACK_STEP", 1 * MiB)
    monkeypatch.setattr(durable, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    with durable.DurableFile(tmp_path / "f") as f:
        for _ in range(5):
            f.write(payload(700 * 1024))
    ends = [offset + length for offset, length in started]
    assert started and started[0][0] == 0
    assert [offset for offset, _ in started[1:]] == ends[:-1]  # contiguous, in order
    assert ends[-1] <= 5 * 700 * 1024


@pytest.mark.skipif(durable._watcher is None, reason="early writeback needs Linux sync_file_range")
def test_writeback_starts_while_a_plain_writer_writes(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(durable, "WRITEBACK_STEP", 1 * MiB)
    monkeypatch.setattr(durable, "start_writeback", lambda fd, offset, length: started.append((fd, offset, length)))

    def slow_writer(item, path):
        with open(path, "wb") as f:
            for _ in range(8):
                f.write(payload(MiB))
                f.flush()
                time.sleep(durable.POLL * 2)

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    e = engine(tmp_path)
    before = open_fds()
    (record,) = e.save(0, 1, {}, slow_writer)
    assert len(started) >= 2  # during the write, not after it
    assert all(offset < 8 * MiB for _fd, offset, _length in started)
    deadline = time.monotonic() + 2
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds() == before  # the watcher closed what it opened
    assert record.files[0].checksum == on_disk(e, record)
    e.close()


@pytest.fixture
def fsyncs(monkeypatch):
    """Every fsync as (inode, modification time then, whether a folder); calls the real one."""
    calls = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        calls.append((st.st_ino, st.st_mtime_ns, stat.S_ISDIR(st.st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_a_local_save_fsyncs_each_file_once(tmp_path, fsyncs):
    """A DurableFile fsyncs as it closes, so publishing it takes no second fsync; other files are fsynced there."""

    def write(item, path):
        with durable.DurableFile(path) as f:
            f.write(payload(3 * MiB))
        with open(path + ".extra", "wb") as f:
            f.write(b"beside it")

    e = engine(tmp_path)
    e.save(0, 1, {}, write)  # the first commit creates the journal
    fsyncs.clear()
    (record,) = e.save(1, 2, {}, write)
    root = tmp_path / "ckpt"
    files = [root / f.path for f in record.files] + [root / f"{record.name}.meta.json", root / "manifest.journal"]
    inodes = [os.stat(path).st_ino for path in files]
    assert sorted(ino for ino, _mtime, folder in fsyncs if not folder) == sorted(inodes)
    assert [ino for ino, _mtime, folder in fsyncs if folder] == [os.stat(root).st_ino]  # the renames
    e.close()


def test_only_saves_to_a_local_disk_fsync_a_durable_file(tmp_path, fsyncs):
    with durable.DurableFile(tmp_path / "elsewhere") as f:  # e.g. a remote store's staging copy
        f.write(b"x" * 1000)
    assert fsyncs == []
    with durable.saving_to_disk(str(tmp_path / "folder")):
        with pytest.raises(ValueError), durable.DurableFile(tmp_path / "folder-sibling") as f:
            raise ValueError("not below the folder")
        os.mkdir(tmp_path / "folder")
        with pytest.raises(ValueError), durable.DurableFile(tmp_path / "folder" / "failed") as f:
            f.write(b"partial")
            raise ValueError("a writer that failed: nothing to keep")
        assert fsyncs == []
        with durable.DurableFile(tmp_path / "folder" / "kept") as f:
            f.write(b"x" * 1000)
    assert [ino for ino, _mtime, _folder in fsyncs] == [os.stat(tmp_path / "folder" / "kept").st_ino]
    with durable.DurableFile(tmp_path / "folder" / "after") as f:  # the block ended
        f.write(b"x")
    assert len(fsyncs) == 1
