"""The CLI on directories written by someone else, and on faults: no escape sequence reaches the
terminal, brackets are not rich markup, nothing ends in a traceback.

Hostile names are planted in a real checkpoint directory: a file inside it whose path holds
control characters and brackets, a tag and a metric name with escape sequences.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys

import pytest

from checkpoint_hooks.cli import main, printable
from checkpoint_hooks.core.directory import CheckpointDirectory
from tests.cli.test_cli import make_dir, run_cli

# a folder `runs[`, a folder `oops]`, then a file named with an OSC title change, a clear screen and `[word]`
HOSTILE_PATH = "runs[/oops]/x\x1b[2Jy\x1b]0;pwned\x07[word].ckpt"
HOSTILE_TAG = "\x1b[2J[red]t"
HOSTILE_METRIC = "val\x1b[31m_loss$\\frac$"  # `$...$` is math to matplotlib: a parse error if not escaped
RAW_SEQUENCES = ("\x1b", "\x07")


def plant(path, file_path=HOSTILE_PATH, tag=HOSTILE_TAG, metric=HOSTILE_METRIC):
    """Rewrite the index of `path` so that its newest checkpoint's file, tags and metrics carry hostile names.

    The file is moved to `file_path` (inside the directory), the policy monitors `metric`,
    and every record and history entry logs `metric` next to val_loss.
    """
    data = json.loads(CheckpointDirectory(str(path)).read_manifest().to_bytes())
    newest = data["records"][-1]
    target = path.joinpath(*file_path.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    path.joinpath(newest["files"][0]["path"]).rename(target)
    newest["files"][0]["path"] = file_path
    newest["tags"] = sorted({*newest["tags"], tag})
    data["policy"]["monitor"] = metric
    data["policy"]["filename"] = "epoch={epoch:03d}"  # a monitor with `[` in it cannot name the files
    for entry in data["records"] + data["history"]:
        entry["metrics"][metric] = entry["metrics"]["val_loss"]
    (path / "manifest.json").write_text(json.dumps(data))
    for derived in ("manifest.head", "manifest.journal"):  # both describe the index as it was
        (path / derived).unlink(missing_ok=True)
    return target


@pytest.fixture
def hostile(tmp_path):
    """Two checkpoints; the newest, and best, one (epoch 1) carries the hostile names."""
    run = tmp_path / "run"
    make_dir(run, [0.5, 0.3], top_k=2)
    plant(run)
    return run


def assert_clean(*streams):
    for text in streams:
        assert "Traceback" not in text
        for raw in RAW_SEQUENCES:
            assert raw not in text


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("a\x1b]0;pwned\x07b") == "a\\x1b]0;pwned\\x07b"
    assert printable("line\nforged") == "line\\x0aforged"
    assert printable("\u202eevil") == "\\u202eevil"  # right-to-left override
    assert printable("bad\udcffbyte") == "bad\\udcffbyte"  # an undecodable file name byte
    assert printable("épreuve 日本 [word] $x$") == "épreuve 日本 [word] $x$"


def test_ls_piped_shows_hostile_names_escaped_and_whole(hostile):
    code, out, err = run_cli("ls", str(hostile))
    assert code == 0 and err == ""
    assert_clean(out, err)
    assert printable(HOSTILE_PATH) in out  # whole, `[/oops]` and `[word]` literally
    assert "[word]" in out and "runs[/oops]" in out
    assert printable(HOSTILE_METRIC) in out.splitlines()[1]
    assert printable(HOSTILE_TAG) in out


def test_ls_json_stays_exact(hostile):
    code, out, err = run_cli("ls", str(hostile), "--json")
    assert code == 0
    assert_clean(out, err)
    assert out.isascii()
    rows = json.loads(out)
    assert rows[-1]["path"] == HOSTILE_PATH and HOSTILE_TAG in rows[-1]["tags"]
    assert HOSTILE_METRIC in rows[-1]["metrics"]


def test_ls_piped_never_cuts_a_long_path(tmp_path, capsys):
    make_dir(tmp_path, [0.5, 0.3], top_k=2)
    long_path = "deep/" * 20 + "n" * 150 + ".ckpt"
    plant(tmp_path, file_path=long_path, tag="best", metric="val_loss")
    assert main(["ls", str(tmp_path), "--verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith(long_path) and " yes " in line for line in lines)


def test_best_verify_and_prune_escape_paths(hostile, capsys):
    shown = f"{printable(str(hostile))}/{printable(HOSTILE_PATH)}"
    code, out, err = run_cli("best", str(hostile))
    assert (code, out.strip()) == (0, shown)
    assert_clean(out, err)

    hostile.joinpath(*HOSTILE_PATH.split("/")).write_bytes(b"short")
    assert main(["verify", str(hostile)]) == 1
    out = capsys.readouterr().out
    assert_clean(out)
    assert f"BAD {shown}: size 5 bytes" in out

    policy = hostile.parent / "policy.yaml"
    policy.write_text("monitor: val_loss\ntop_k: 0\nlast: false\n")  # keeps nothing
    assert main(["prune", str(hostile), "--policy", str(policy), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    assert f"would delete {shown} (epoch 1)" in out


def test_plot_with_hostile_metric_names(hostile, tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["plot", str(hostile), "-o", str(out), "--metrics", "val_loss"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(hostile), "--metric", "\x1b[2Jnone", "-o", str(out.with_suffix(".svg"))]) == 1
    streams = capsys.readouterr()
    assert_clean(streams.out, streams.err)
    assert "no values of '\\x1b[2Jnone'" in streams.err and printable(HOSTILE_METRIC) in streams.err
    assert not out.with_suffix(".svg").exists()


def _run_on_terminal(columns, *args):
    """The CLI with stdout on a pseudo-terminal `columns` wide (colour off: only rich's bold remains)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERM")}
    env.update(TERM="xterm-256color", NO_COLOR="1")
    proc = subprocess.Popen([sys.executable, "-m", "checkpoint_hooks.cli", *args], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while select.select([leader], [], [], 30)[0]:  # no output for 30 s: a hang, end the test
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        code = proc.wait(timeout=60)
    return code, b"".join(chunks).decode().replace("\r\n", "\n")


def test_ls_on_a_terminal_escapes_hostile_names(hostile):
    code, out = _run_on_terminal(200, "ls", str(hostile))
    assert code == 0 and "Traceback" not in out
    for raw in ("\x1b]", "\x07", "\x1b[2J", "\x1b[31m"):  # rich itself only writes bold on and off
        assert raw not in out
    assert set(re.findall(r"\x1b\[[0-9;]*m", out)) <= {"\x1b[1m", "\x1b[0m"}
    assert printable(HOSTILE_PATH) in out  # 200 columns: the row fits, nothing folded


def test_ls_on_a_narrow_terminal_folds_the_path_instead_of_cutting_it(tmp_path):
    make_dir(tmp_path, [0.5, 0.3], top_k=2)
    code, out = _run_on_terminal(60, "ls", str(tmp_path))
    assert code == 0
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in out.splitlines()]
    assert all(len(line) <= 60 for line in lines)
    header = next(i for i, line in enumerate(lines) if "path" in line.split())
    column = lines[header].rindex("path")
    path_cells = "".join(line[column:].strip() for line in lines[header + 2 :])
    assert path_cells == "epoch=000-val_loss=0.5000.ckptepoch=001-val_loss=0.3000.ckpt"
    assert "…" not in out


# -- faults: one `error:` line, the right exit code ------------------------------------------------


def one_error_line(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_repair_of_a_read_only_directory(tmp_path):
    run = tmp_path / "run"
    make_dir(run, [0.5, 0.4], top_k=2)
    (run / "manifest.json").write_text("{ not json")
    run.chmod(0o555)
    try:
        if os.access(run, os.W_OK):
            pytest.skip("this user writes to read-only directories (root); see the next test")
        code, _, err = run_cli("verify", "--repair", str(run))
    finally:
        run.chmod(0o755)
    assert code == 3
    assert "Permission denied" in one_error_line(err) and str(run) in err


def test_repair_that_cannot_write_its_index(tmp_path):
    """A folder where the index's head file goes fails the write for any user, root included."""
    run = tmp_path / "run"
    make_dir(run, [0.5, 0.4], top_k=2)
    (run / "manifest.json").unlink()
    (run / "manifest.head").unlink(missing_ok=True)
    (run / "manifest.head").mkdir()
    (run / "manifest.head" / "keep").write_text("x")
    code, _, err = run_cli("verify", "--repair", str(run))
    assert code == 3
    assert str(run / "manifest.head") in one_error_line(err)


@pytest.mark.parametrize(
    "output, reason",
    [
        ("notes.txt/out.png", "is not a folder"),  # a path under a regular file: fails for root too
        ("missing/out.png", "does not exist"),
        ("out.xyz", ".xyz is not an image format"),
        ("out", "no extension"),
        ("folder.png", "Is a directory"),  # passes the checks, fails when written
    ],
)
def test_plot_to_a_path_that_cannot_be_written(tmp_path, capsys, output, reason):
    run = tmp_path / "run"
    make_dir(run, [0.5, 0.4])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    assert main(["plot", str(run), "-o", str(tmp_path / output)]) == 2
    assert reason in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "out.xyz").exists()


def test_plot_to_an_unwritable_path_from_a_subprocess(tmp_path):
    run = tmp_path / "run"
    make_dir(run, [0.5, 0.4])
    (tmp_path / "notes.txt").write_text("x")
    code, out, err = run_cli("plot", str(run), "-o", str(tmp_path / "notes.txt" / "out.png"))
    assert code == 2 and out == ""
    assert "notes.txt" in one_error_line(err)


@pytest.mark.parametrize("command", [["ls"], ["ls", "--verify"], ["best"], ["verify"], ["verify", "--repair"], ["plot"]])
@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_a_url_to_a_missing_directory(tmp_path, capsys, command, scheme):
    url = f"local://{tmp_path}/missing" if scheme == "local" else f"memory://{tmp_path.name}-missing"
    argv = [command[0], *command[1:], url] + (["-o", str(tmp_path / "m.png")] if command == ["plot"] else [])
    assert main(argv) == 3
    assert url in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("scheme", ["path", "local", "memory"])
def test_prune_of_a_missing_directory_creates_nothing(tmp_path, capsys, scheme):
    policy = tmp_path / "policy.yaml"
    policy.write_text("monitor: val_loss\ntop_k: 1\n")
    url = {"path": str(tmp_path / "missing"), "local": f"local://{tmp_path}/missing"}.get(
        scheme, f"memory://{tmp_path.name}-missing"
    )
    assert main(["prune", url, "--policy", str(policy)]) == 3
    assert url in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "missing").exists()


def test_an_unknown_url_protocol(capsys):
    assert main(["ls", "nosuchprotocol://bucket/run"]) == 3
    assert "nosuchprotocol" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["best"]])
def test_a_folder_in_place_of_the_manifest(tmp_path, capsys, command):
    (tmp_path / "manifest.json").mkdir()
    assert main([*command, str(tmp_path)]) == 3
    assert "manifest.json" in one_error_line(capsys.readouterr().err)


def test_verify_ignores_checkpoints_pruned_while_it_runs(tmp_path, monkeypatch, capsys):
    """A training job prunes between verify's read of the index and its check of the files."""
    run = tmp_path / "run"
    make_dir(run, [0.5, 0.4, 0.3, 0.2], top_k=-1)
    policy = tmp_path / "policy.yaml"
    policy.write_text("monitor: val_loss\ntop_k: 1\nlast: true\n")
    check_files = CheckpointDirectory.verify_record
    pruned = []

    def prune_first(self, record, checksums=True):
        if not pruned:  # the index verify holds still lists all four
            pruned.append(main(["prune", str(run), "--policy", str(policy)]))
        return check_files(self, record, checksums)

    monkeypatch.setattr(CheckpointDirectory, "verify_record", prune_first)
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert pruned == [0] and "deleted 3 of 4" in out
    assert "BAD" not in out and "ok: 1 file(s) of 1 checkpoint(s) verify" in out
