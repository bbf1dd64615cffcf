"""format='sharded': FSDP2 (`fully_shard`) training on CPU ranks (gloo), every rank writing its shards.

Each run starts the ranks of tests/torch/sharded_script.py as processes. When a rank dies the
others are killed too, as a job launcher does. CH_SHARDED_KILLS=N runs N random kills instead of 2.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_hooks.core import CheckpointDirectory
from checkpoint_hooks.core.manifest import read_sidecar
from checkpoint_hooks.torch import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_script.py")
EPOCHS = 6


def env() -> dict[str, str]:
    """The ranks' environment: this process's, read at each start (an S3 fixture may have added to it)."""
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


class Ranks:
    """The processes of one run: rank 0's stdout is read, the others' discarded; stderr goes to files."""

    def __init__(self, tmp: Path, dirpath: Path | str, world: int, epochs: int, tag: str, *faults: str) -> None:
        self.tmp, self.tag, self.world = tmp, tag, world
        rendezvous = tmp / f"rdv-{tag}"
        self.procs = []
        for rank in range(world):
            args = [sys.executable, SCRIPT, "--rank", str(rank), "--world", str(world), "--rendezvous", str(rendezvous),
                    "--dir", str(dirpath), "--out", str(tmp / f"{tag}-"), "--epochs", str(epochs), *faults]
            with open(tmp / f"{tag}-{rank}.err", "w") as err:
                self.procs.append(subprocess.Popen(
                    args, cwd=ROOT, env=env(), stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=err, text=True
                ))

    def wait_for_first_save(self) -> None:
        out = self.procs[0].stdout
        assert out is not None
        while (line := out.readline()) and not line.startswith("saved"):
            pass

    def finish(self, timeout: float = 180) -> list[int | None]:
        """Wait for every rank; once one fails the rest are killed. Returns the exit codes."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            if any(p.poll() not in (None, 0, 3) for p in self.procs) or time.monotonic() > deadline:
                time.sleep(0.3)  # a rank that fails on its own says why first
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        for p in self.procs:
            if p.stdout is not None:
                p.stdout.close()
        return [p.wait() for p in self.procs]

    def results(self) -> list[dict[str, Any]]:
        codes = self.finish()
        errors = [(self.tmp / f"{self.tag}-{r}.err").read_text()[-3000:] for r in range(self.world)]
        assert all(c in (0, 3) for c in codes), f"exit codes {codes}\n" + "\n".join(errors)
        return [json.loads((self.tmp / f"{self.tag}-{rank}.json").read_text()) for rank in range(self.world)]


def run(tmp: Path, dirpath: Path | str, world: int, epochs: int, tag: str, *faults: str) -> list[dict[str, Any]]:
    return Ranks(tmp, dirpath, world, epochs, tag, *faults).results()


def killed(tmp: Path, dirpath: Path | str, world: int, epochs: int, tag: str, *faults: str) -> None:
    codes = Ranks(tmp, dirpath, world, epochs, tag, *faults).finish()
    assert -signal.SIGKILL in codes, codes


def kept(dirpath: Path | str) -> set[str]:
    manifest = CheckpointDirectory(str(dirpath)).read_manifest()
    assert manifest is not None
    return {r.name for r in manifest.records}


def verify(dirpath: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "checkpoint_hooks.cli", "verify", str(dirpath)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)


def leftovers(dirpath: Path) -> list[str]:
    return [n for n in os.listdir(dirpath) if n.startswith(".staging")]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted two-rank run, and the kept set of a one-process run of the same epochs."""
    tmp = tmp_path_factory.mktemp("oracle")
    two = run(tmp, tmp / "two", 2, EPOCHS, "two")
    one = run(tmp, tmp / "one", 1, EPOCHS, "one")
    assert [r["trained"] for r in [*two, *one]] == [list(range(EPOCHS))] * 3
    assert kept(tmp / "one") == kept(tmp / "two")
    return {"run": two[0], "kept": kept(tmp / "one")}


def test_ranks_killed_mid_save_resume_bit_identical_with_the_kept_set_of_one_process(
    tmp_path: Path, oracle: dict[str, Any]
) -> None:
    d = tmp_path / "d"
    # rank 1 dies after writing its shards of epoch 2, before rank 0 commits them; then rank 0 at epoch 4
    killed(tmp_path, d, 2, EPOCHS, "a", "--die-in-save-at-epoch", "2", "--fault-rank", "1")
    killed(tmp_path, d, 2, EPOCHS, "b", "--die-in-save-at-epoch", "4", "--fault-rank", "0")
    done = run(tmp_path, d, 2, EPOCHS, "c")
    assert [r["trained"] for r in done] == [[4, 5], [4, 5]]
    assert done[0]["start"] == oracle["run"]["epochs"]["3"]  # model and optimizer as saved at epoch 3
    assert done[0]["final"] == oracle["run"]["final"]  # every rank's random states restored: bit-identical
    assert kept(d) == oracle["kept"]
    assert not leftovers(d)
    checked = verify(d)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for record in CheckpointDirectory(str(d)).read_manifest().records:  # type: ignore[union-attr]
        assert record.folder == record.name + ".dcp"
        assert {f.path[len(record.folder) + 1 :] for f in record.files} == {
            ".metadata", "__0_0.distcp", "__1_0.distcp", "checkpoint_hooks.pt"
        }
        assert all(f.checksum and f.checksum.startswith("xxh3_128:") for f in record.files)


@pytest.mark.parametrize(("corrupt", "finder"), [("__0_0.distcp", 1), ("__1_0.distcp", 0)])
def test_a_corrupt_shard_is_named_by_verify_and_every_rank_falls_back(tmp_path: Path, corrupt: str, finder: int) -> None:
    """Each rank verifies a share of the files: here `finder` is the rank that reads the corrupt one."""
    d = tmp_path / "d"
    first = run(tmp_path, d, 2, 3, "a")
    manifest = CheckpointDirectory(str(d)).read_manifest()
    assert manifest is not None
    newest = max(manifest.records, key=lambda r: r.seq)
    shard = next(f.path for f in newest.files if f.path.endswith(corrupt))
    with open(d / shard, "r+b") as f:
        f.seek(os.path.getsize(d / shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    checked = verify(d)
    assert checked.returncode != 0 and corrupt in checked.stdout + checked.stderr
    again = run(tmp_path, d, 2, 5, "b")
    previous = str(newest.epoch - 1)
    assert [r["trained"] for r in again] == [list(range(newest.epoch, 5))] * 2
    assert again[0]["start"] == first[0]["epochs"][previous]
    warned = [(tmp_path / f"b-{rank}.err").read_text() for rank in (0, 1)]
    assert f"{corrupt}: checksum mismatch" in warned[finder] and corrupt not in warned[1 - finder]
    assert "skipping checkpoint" in warned[0]  # the writer says so either way


@pytest.mark.parametrize("world", [1, 4])
def test_a_run_saved_on_two_ranks_resumes_on_another_world_size(tmp_path: Path, world: int) -> None:
    d = tmp_path / "d"
    first = run(tmp_path, d, 2, 3, "a")
    again = run(tmp_path, d, world, 5, "b")
    assert [r["trained"] for r in again] == [[3, 4]] * world
    assert again[0]["start"] == first[0]["epochs"]["2"]  # DCP resharded model and optimizer state
    assert not leftovers(d)


def test_a_failure_on_one_rank_fails_the_save_on_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    d = tmp_path / "d"
    ranks = run(tmp_path, d, 2, 3, "a", "--fail-save-at-epoch", "1", "--fault-rank", "1")
    for report in ranks:
        assert report["trained"] == [0, 1]
        assert "could not save epoch=001" in report["error"] and "No space left on device" in report["error"]
        assert "nothing of it was committed" in report["error"]
    assert {r.epoch for r in CheckpointDirectory(str(d)).read_manifest().records} == {0}  # type: ignore[union-attr]
    assert not [n for n in os.listdir(d) if n.startswith("epoch=001")] and not leftovers(d)


def test_with_on_save_error_warn_every_rank_goes_on(tmp_path: Path) -> None:
    d = tmp_path / "d"
    ranks = run(tmp_path, d, 2, 3, "a", "--fail-save-at-epoch", "1", "--fault-rank", "1", "--on-save-error", "warn")
    assert [r["trained"] for r in ranks] == [[0, 1, 2]] * 2 and not any(r["error"] for r in ranks)
    assert {r.epoch for r in CheckpointDirectory(str(d)).read_manifest().records} == {0, 2}  # type: ignore[union-attr]
    assert "could not save epoch=001" in (tmp_path / "a-1.err").read_text()


def test_random_kills_of_any_rank_end_bit_identical(tmp_path: Path, oracle: dict[str, Any]) -> None:
    d = tmp_path / "d"
    chooser = random.Random(int(os.environ.get("CH_SHARDED_SEED", "0")))
    for i in range(int(os.environ.get("CH_SHARDED_KILLS", "2"))):
        ranks = Ranks(tmp_path, d, 2, EPOCHS, f"k{i}")
        ranks.wait_for_first_save()  # a moment of training, not of start-up
        time.sleep(chooser.uniform(0, 1.5))
        victim = ranks.procs[chooser.randrange(2)]
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
        ranks.finish()
    done = run(tmp_path, d, 2, EPOCHS, "end")
    assert done[0]["final"] == oracle["run"]["final"]
    assert kept(d) == oracle["kept"]
    checked = verify(d)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_in_one_process_a_sharded_checkpoint_is_a_folder_that_resumes(tmp_path: Path) -> None:
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.Adam(model.parameters())
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)

    starts: list[dict[str, torch.Tensor]] = []

    def train(epochs: int) -> tuple[Checkpointer, list[int], dict[str, torch.Tensor], Any]:
        model, optimizer, scheduler = build()
        ckpt = Checkpointer(model, optimizer, scheduler=scheduler, dirpath=str(tmp_path / "d"), format="sharded")
        trained: list[int] = []
        for epoch in ckpt.epochs(epochs):
            if not trained:
                starts.append({k: v.clone() for k, v in model.state_dict().items()})
            trained.append(epoch)
            optimizer.zero_grad()
            model(torch.randn(3, 4)).sum().backward()
            optimizer.step()
            scheduler.step()
            ckpt.epoch_end()
        return ckpt, trained, {k: v.clone() for k, v in model.state_dict().items()}, scheduler

    ckpt, trained, saved, _ = train(2)
    assert trained == [0, 1] and ckpt.last_model_path.endswith(".dcp") and os.path.isdir(ckpt.last_model_path)
    names = os.listdir(ckpt.last_model_path)
    assert ".metadata" in names and "checkpoint_hooks.pt" in names and "__0_0.distcp" in names
    again, trained, _, scheduler = train(3)
    assert trained == [2] and again.resumed_from is not None and again.resumed_from.path == ckpt.last_model_path
    assert scheduler.last_epoch == 3  # restored at 2, then stepped once
    assert again.resumed_from.state is not None and again.resumed_from.state.epoch == 1
    assert all(torch.equal(saved[k], starts[1][k]) for k in saved)  # the weights as saved after epoch 1
    assert not all(torch.equal(saved[k], starts[0][k]) for k in saved)


def test_a_sharded_checkpoint_survives_being_copied_elsewhere(tmp_path: Path) -> None:
    """The index names the folder, and every file inside it, relative to the directory."""
    model = torch.nn.Linear(2, 2)
    ckpt = Checkpointer(model, dirpath=str(tmp_path / "d"), format="sharded")
    for _ in ckpt.epochs(1):
        ckpt.epoch_end()
    shutil.copytree(tmp_path / "d", tmp_path / "moved")
    again = Checkpointer(torch.nn.Linear(2, 2), dirpath=str(tmp_path / "moved"), format="sharded")
    assert list(again.epochs(2)) == [1]
    assert again.resumed_from is not None and again.resumed_from.path.startswith(str(tmp_path / "moved"))


def on_s3(url: str) -> tuple[list[str], list[str]]:
    """Files of a remote directory that no committed checkpoint holds: those an uncommitted sidecar lists
    (cleanup finds them at the next start), and those no sidecar lists (nothing would ever find them)."""
    directory = CheckpointDirectory(url)
    getattr(directory.store, "fs").invalidate_cache()  # noqa: B009  # the ranks wrote since this process listed
    manifest = directory.read_manifest()
    committed = {r.name for r in manifest.records} if manifest is not None else set()
    held: set[str] = set()
    listed: set[str] = set()
    for path in directory.sidecars():
        record = read_sidecar(directory.index.read_bytes(path) or b"")
        (held if record.name in committed else listed).update(f.path for f in record.files)
        if record.name not in committed:
            listed.add(path)
    loose = [f for f in directory.store.list_files() if ".dcp/" in f and f not in held]
    return sorted(f for f in loose if f in listed), sorted(f for f in loose if f not in listed)


def test_on_s3_ranks_killed_mid_upload_resume_bit_identical(
    tmp_path: Path, bucket: str, oracle: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank uploads its own shards; rank 0 commits once every upload succeeded."""
    url = f"{bucket}/run"
    scratch = tmp_path / "tmp"  # the ranks' $TMPDIR, where each writes its shards before uploading them
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    # rank 1 dies once its shards of epoch 2 are uploaded: rank 0 cannot tell whether every upload ended,
    # so it leaves what was uploaded to the next start's cleanup
    killed(tmp_path, url, 2, EPOCHS, "a", "--die-in-save-at-epoch", "2", "--fault-rank", "1")
    assert not [r for r in CheckpointDirectory(url).read_manifest().records if r.epoch == 2]  # type: ignore[union-attr]
    found, lost = on_s3(url)
    assert {f.rsplit("/", 1)[-1] for f in found if f.startswith("epoch=002")} == {
        ".metadata", "__0_0.distcp", "__1_0.distcp", "checkpoint_hooks.pt"
    }
    assert lost == []
    # rank 0 dies at epoch 4 once every rank uploaded its files, before its commit
    killed(tmp_path, url, 2, EPOCHS, "b", "--die-in-save-at-epoch", "4", "--fault-rank", "0")
    found, lost = on_s3(url)
    assert {f.rsplit("/", 1)[-1] for f in found if f.startswith("epoch=004")} == {
        ".metadata", "__0_0.distcp", "__1_0.distcp", "checkpoint_hooks.pt"
    }
    assert lost == []  # every uploaded file is listed by a sidecar rank 0 published first: cleanup finds it
    done = run(tmp_path, url, 2, EPOCHS, "c")
    assert [r["trained"] for r in done] == [[4, 5], [4, 5]]
    assert done[0]["start"] == oracle["run"]["epochs"]["3"]
    assert done[0]["final"] == oracle["run"]["final"]
    assert kept(url) == oracle["kept"]
    assert on_s3(url) == ([], [])  # cleanup removed what the killed saves left
    assert [n for n in os.listdir(scratch) if n.startswith("checkpoint_hooks-")] == []  # the killed ranks' copies too
    checked = verify(url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for record in CheckpointDirectory(url).read_manifest().records:  # type: ignore[union-attr]
        assert {f.path[len(record.folder or "") + 1 :] for f in record.files} == {
            ".metadata", "__0_0.distcp", "__1_0.distcp", "checkpoint_hooks.pt"
        }
        assert all(f.checksum and f.checksum.startswith("xxh3_128:") for f in record.files)


def test_on_s3_a_failed_upload_fails_the_save_everywhere_and_a_run_resumes_on_one_rank(tmp_path: Path, bucket: str) -> None:
    url = f"{bucket}/run"
    ranks = run(tmp_path, url, 2, 3, "a", "--fail-upload-at-epoch", "1", "--fault-rank", "1")
    for report in ranks:
        assert report["trained"] == [0, 1]
        assert "could not save epoch=001" in report["error"] and "nothing of it was committed" in report["error"]
    assert "connection reset after the upload" in ranks[1]["error"]
    assert {r.epoch for r in CheckpointDirectory(url).read_manifest().records} == {0}  # type: ignore[union-attr]
    assert on_s3(url) == ([], [])  # rank 1's upload went with the failed save
    again = run(tmp_path, url, 1, 3, "b")
    assert again[0]["trained"] == [1, 2]
    assert again[0]["start"] == ranks[0]["epochs"]["0"]  # read from the store through DCP's fsspec reader, resharded


def test_in_the_background_every_rank_saves_in_its_worker_and_a_killed_run_resumes_bit_identical(
    tmp_path: Path, oracle: dict[str, Any]
) -> None:
    """async_save: each rank copies its shards at the epoch end and writes them in its save worker."""
    d = tmp_path / "d"
    # rank 1 dies in its worker after writing its shards of epoch 2: rank 0's worker is waiting for them
    killed(tmp_path, d, 2, EPOCHS, "a", "--async-save", "--die-in-save-at-epoch", "2", "--fault-rank", "1")
    done = run(tmp_path, d, 2, EPOCHS, "b", "--async-save")
    assert [r["threads"] for r in done] == [["checkpoint_hooks-save"]] * 2  # never on the training thread
    assert done[0]["trained"][0] <= 2
    assert done[0]["start"] == oracle["run"]["epochs"][str(done[0]["trained"][0] - 1)]  # the copy made at that epoch end
    assert done[0]["final"] == oracle["run"]["final"]
    assert kept(d) == oracle["kept"]
    assert not leftovers(d)
    checked = verify(d)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_background_save_that_fails_on_one_rank_raises_on_every_rank_at_the_next_epoch_end(tmp_path: Path) -> None:
    d = tmp_path / "d"
    ranks = run(tmp_path, d, 2, 4, "a", "--async-save", "--fail-save-at-epoch", "1", "--fault-rank", "1")
    for report in ranks:
        assert report["trained"] == [0, 1, 2]  # raised by epoch 2's end, before it plans
        assert "could not save epoch=001" in report["error"] and "No space left on device" in report["error"]
    assert {r.epoch for r in CheckpointDirectory(str(d)).read_manifest().records} == {0}  # type: ignore[union-attr]
    assert not leftovers(d)


def test_a_copy_that_fails_on_one_rank_fails_the_background_save_on_every_rank_at_once(tmp_path: Path) -> None:
    d = tmp_path / "d"
    ranks = run(tmp_path, d, 2, 3, "a", "--async-save", "--fail-copy-at-epoch", "1", "--fault-rank", "1")
    for report in ranks:
        assert report["trained"] == [0, 1]  # raised by epoch 1's own end: no worker waits for the other rank
        assert "could not save epoch=001" in report["error"]
    assert "no host memory left for the copy" in ranks[1]["error"]
    assert "another rank could not copy its part" in ranks[0]["error"]
    assert {r.epoch for r in CheckpointDirectory(str(d)).read_manifest().records} == {0}  # type: ignore[union-attr]


def test_on_s3_in_the_background(tmp_path: Path, bucket: str) -> None:
    url = f"{bucket}/run"
    first = run(tmp_path, url, 2, 3, "a", "--async-save")
    assert [r["threads"] for r in first] == [["checkpoint_hooks-save"]] * 2
    assert on_s3(url) == ([], [])
    checked = verify(url)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again = run(tmp_path, url, 2, 4, "b", "--async-save")
    assert [r["trained"] for r in again] == [[3]] * 2 and again[0]["start"] == first[0]["epochs"]["2"]


def test_in_one_process_a_background_sharded_save_writes_the_state_of_its_epoch_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.Adam(model.parameters())
    ckpt = Checkpointer(model, optimizer, dirpath=str(tmp_path / "d"), format="sharded", async_save=True)
    for _ in ckpt.epochs(1):
        optimizer.zero_grad()
        model(torch.randn(3, 64)).sum().backward()
        optimizer.step()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.epoch_end()
        with torch.no_grad():  # right away, while the worker may still be writing
            for p in model.parameters():
                p.add_(100.0)
    again = torch.nn.Linear(64, 64)
    resumed = Checkpointer(again, torch.optim.Adam(again.parameters()), dirpath=str(tmp_path / "d"), format="sharded")
    assert list(resumed.epochs(2)) == [1]
    assert all(torch.equal(again.state_dict()[k], saved[k]) for k in saved)


class _Planted:
    """A pickle that creates a file when it is loaded: what a tampered `.metadata` could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_a_tampered_metadata_is_caught_before_dcp_unpickles_it(tmp_path: Path) -> None:
    def train(epochs: int) -> Checkpointer:
        model = torch.nn.Linear(4, 2)
        ckpt = Checkpointer(model, torch.optim.Adam(model.parameters()), dirpath=str(tmp_path / "d"), format="sharded",
                            snapshots={"every_n_epochs": 1})
        for _ in ckpt.epochs(epochs):
            ckpt.epoch_end()
        return ckpt

    train(2)
    manifest = CheckpointDirectory(str(tmp_path / "d")).read_manifest()
    assert manifest is not None
    newest = max(manifest.records, key=lambda r: r.seq)
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "d" / (newest.folder or "") / ".metadata").write_bytes(pickle.dumps(_Planted(str(marker))))
    again = train(3)
    assert not marker.exists()
    assert again.resumed_from is not None and again.resumed_from.record is not None
    assert again.resumed_from.record.epoch == newest.epoch - 1  # the previous checkpoint
