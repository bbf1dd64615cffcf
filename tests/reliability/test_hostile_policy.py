"""Policy files and values written by someone else: each ends in one short `error:` line (exit 2),
never a hang, a memory blow-up, a flood of output or a traceback.

Most cases run the CLI in-process (`main([...])`, the same code as the command); the ones about
the interpreter's limits (memory, recursion, integer conversion, decoding) also run it as a real
subprocess, with a memory cap so that a regression fails fast instead of exhausting the machine.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys

import pytest

from checkpoint_hooks import CheckpointPolicy, PolicyError, SnapshotPolicy, load_policy
from checkpoint_hooks.cli import main
from checkpoint_hooks.core.naming import format_name, reserved_reason

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_OUTPUT = 1000
MEMORY_CAP = 2 * 1024**3  # address space of the CLI subprocess: far above what a policy check needs

BILLION_LAUGHS = "".join(
    [f'l0: &l0 [{", ".join(["lol"] * 9)}]\n']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)]
    + ["filename: *l8\n"]
)


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_check(path) -> tuple[int, str, str]:
    """`checkpoint-hooks policy check PATH` as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "checkpoint_hooks.cli", "policy", "check", str(path)],
        capture_output=True, text=True, timeout=20, preexec_fn=_cap_memory,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    return proc.returncode, proc.stdout, proc.stderr


def check_in_process(path, capsys) -> tuple[int, str, str]:
    code = main(["policy", "check", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: tuple[int, str, str], path, *fragments: str) -> str:
    """Exit 2, one short `error:` line on stderr naming the file, and every fragment in it."""
    code, out, err = result
    assert code == 2, (code, out[:MAX_OUTPUT], err[:MAX_OUTPUT])
    assert len(out) + len(err) < MAX_OUTPUT, err[:MAX_OUTPUT]
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def write(tmp_path, data: str | bytes, name: str = "policy.yaml"):
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


# -- YAML that expands, nests, repeats or overflows ---------------------------------------


def test_billion_laughs_is_refused_at_the_first_alias(tmp_path):
    path = write(tmp_path, BILLION_LAUGHS)
    assert_refused(run_check(path), path, f"{path}:2:", "alias '*l0'", "aliases")


def test_alias_of_a_plain_value_is_refused_too(tmp_path):
    with pytest.raises(PolicyError, match=r"<string>:2: the alias '\*m' .* write the value out"):
        CheckpointPolicy.from_yaml_text("monitor: &m val_loss\nfilename: *m\n")


def test_anchor_without_alias_is_accepted():
    assert CheckpointPolicy.from_yaml_text("monitor: &m val_loss\n").monitor == "val_loss"


def test_5000_digit_integer(tmp_path):
    path = write(tmp_path, "monitor: val_loss\ntop_k: " + "1" * 5000 + "\n")
    assert_refused(run_check(path), path, f"{path}:2:", "integer of 5000 characters")


def test_5000_digit_integer_as_a_string_is_shortened():
    with pytest.raises(PolicyError) as info:
        CheckpointPolicy.from_yaml_text("monitor: val_loss\ntop_k: '" + "1" * 5000 + "'\n")
    message = str(info.value)
    assert "<string>:2: top_k" in message and "(5000 characters)" in message and len(message) < MAX_OUTPUT


def test_10000_unclosed_brackets(tmp_path):
    path = write(tmp_path, "filename: " + "[" * 10000 + "\n")
    assert_refused(run_check(path), path, f"{path}:1:", "nest more than")


def test_10000_nested_lists(tmp_path, capsys):
    path = write(tmp_path, "monitor: val_loss\nfilename: " + "[" * 10000 + "]" * 10000 + "\n")
    assert_refused(check_in_process(path, capsys), path, f"{path}:2:", "nest more than")


def test_duplicate_keys_name_both_lines(tmp_path, capsys):
    path = write(tmp_path, "monitor: val_loss\ntop_k: 2\nmonitor: val_acc\n")
    assert_refused(check_in_process(path, capsys), path, f"{path}:3:", "'monitor' is given twice, on lines 1 and 3")


def test_duplicate_nested_and_flow_keys():
    with pytest.raises(PolicyError, match=r"<string>:3: the key 'keep' is given twice, on lines 2 and 3"):
        CheckpointPolicy.from_yaml_text("snapshots:\n  keep: 1\n  keep: 2\n")
    with pytest.raises(PolicyError, match=r"<string>:1: the key 'keep' is given twice, on line 1"):
        CheckpointPolicy.from_yaml_text("snapshots: {keep: 1, keep: 2}\n")


def test_merge_key_overrides_are_not_duplicates():
    assert CheckpointPolicy.from_yaml_text("<<: {monitor: val_loss}\nmonitor: val_acc\n").monitor == "val_acc"


# -- files that are not UTF-8 text, or not a policy's size --------------------------------


def test_utf16_file_without_bom(tmp_path):
    path = write(tmp_path, "monitor: val_loss\ntop_k: 2\n".encode("utf-16-le"))
    assert_refused(run_check(path), path, "not UTF-8 text", "save the file as UTF-8")


def test_utf16_file_with_bom(tmp_path, capsys):
    path = write(tmp_path, "monitor: val_loss\n".encode("utf-16"))
    assert_refused(check_in_process(path, capsys), path, "not UTF-8 text")


def test_latin1_file(tmp_path, capsys):
    path = write(tmp_path, "monitor: val_loss\nfilename: 'époque-{epoch}'\n".encode("latin-1"))
    assert_refused(check_in_process(path, capsys), path, f"{path}:2: not UTF-8 text", "byte 0xe9")


def test_utf8_with_bom_is_accepted(tmp_path):
    path = write(tmp_path, "monitor: val_loss\nfilename: 'époque-{epoch}'\n".encode("utf-8-sig"))
    assert CheckpointPolicy.from_yaml(path).filename == "époque-{epoch}"


def test_oversized_file(tmp_path, capsys):
    path = write(tmp_path, "monitor: val_loss\n" + "# padding\n" * 120_000)
    assert_refused(check_in_process(path, capsys), path, "larger than 1 MiB")
    with pytest.raises(PolicyError, match="too large"):
        CheckpointPolicy.from_yaml_text("#" * (2 * 1024 * 1024))


# -- numbers that are not finite ------------------------------------------------------------

FLOAT_FIELDS = [
    ("min_delta: {}\n", "min_delta"),
    ("every_n_minutes: {}\n", "every_n_minutes"),
    ("snapshots:\n  keep_every_n_hours: {}\n", "snapshots.keep_every_n_hours"),
]


def test_every_float_field_is_covered():
    """A float field added later must be listed above (and is then refused non-finite by the model config)."""
    floats = {name for name, f in CheckpointPolicy.model_fields.items() if f.annotation in (float, float | None)}
    floats |= {f"snapshots.{name}" for name, f in SnapshotPolicy.model_fields.items() if f.annotation in (float, float | None)}
    assert floats == {field for _text, field in FLOAT_FIELDS}


@pytest.mark.parametrize("text, field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1.0e+400", "1e400"])
def test_non_finite_floats_from_yaml(text, field, value):
    with pytest.raises(PolicyError) as info:
        CheckpointPolicy.from_yaml_text(text.format(value), source="p.yaml")
    message = str(info.value)
    assert message.startswith("p.yaml:") and f"{field}: Input should be a finite number" in message
    assert "inf and nan are not allowed" in message and len(message.splitlines()) == 1


def test_non_finite_float_through_the_cli(tmp_path, capsys):
    path = write(tmp_path, "min_delta: .inf\n")
    assert_refused(check_in_process(path, capsys), path, f"{path}:1: min_delta", "Received: min_delta=inf")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "nan"])
def test_non_finite_floats_from_keyword_arguments(value):
    for make, field in [
        (lambda: CheckpointPolicy(min_delta=value), "min_delta"),
        (lambda: CheckpointPolicy(every_n_minutes=value), "every_n_minutes"),
        (lambda: CheckpointPolicy(snapshots={"keep_every_n_hours": value}), "snapshots.keep_every_n_hours"),
        (lambda: SnapshotPolicy(keep_every_n_hours=value), "keep_every_n_hours"),
        (lambda: load_policy(None, min_delta=value), "min_delta"),
    ]:
        with pytest.raises(PolicyError, match=f"{field}: Input should be a finite number"):
            make()


def test_finite_floats_still_work():
    policy = CheckpointPolicy(min_delta=1e-3, every_n_minutes=30, snapshots={"keep_every_n_hours": 0.5})
    assert CheckpointPolicy.from_yaml_text(policy.to_yaml()) == policy


# -- names the checkpoint directory keeps for itself ----------------------------------------


@pytest.mark.parametrize(
    "filename, fragment",
    [
        (".staging-{epoch}", "'.staging-'"),
        (".checkpoint_hooks.lock", "lock file"),
        (".hidden-{epoch}", "starts with '.'"),
        ("{epoch:.>4}", "starts with '.'"),
        ("manifest", "index"),
        ("manifest.json", "index"),
        ("Manifest.Journal", "index"),
        ("manifest.head-{epoch}", "index"),
        ("e{epoch}.meta", "sidecar"),
        ("e{epoch}.meta.json", "sidecar"),
    ],
)
def test_reserved_filenames_are_refused(filename, fragment):
    with pytest.raises(PolicyError) as info:
        CheckpointPolicy(filename=filename)
    message = str(info.value)
    assert "filename makes a name like" in message and fragment in message and "choose another name" in message


def test_reserved_filename_through_the_cli(tmp_path, capsys):
    path = write(tmp_path, "filename: '.staging-{epoch}'\n")
    assert_refused(check_in_process(path, capsys), path, f"{path}:1:", "'.staging-1'", "unfinished saves")


@pytest.mark.parametrize("filename", ["epoch={epoch:03d}-{val_loss:.4f}", "manifesto-{epoch}", "meta-{epoch}", "e{epoch}.metadata"])
def test_ordinary_filenames_are_accepted(filename):
    assert CheckpointPolicy(filename=filename).filename == filename


def test_format_name_refuses_a_reserved_rendered_name():
    assert reserved_reason("epoch=001-val_loss=0.5000") is None
    for template in (".staging-{epoch}", "{epoch}.meta", "manifest"):
        with pytest.raises(PolicyError, match="change the filename template"):
            format_name(template, {"epoch": 1})


def test_oversized_format_spec_is_refused_before_rendering():
    with pytest.raises(PolicyError, match="asks for more than 64 characters"):
        CheckpointPolicy(filename="{epoch:999999999d}")
    with pytest.raises(PolicyError, match="makes names of 5000 bytes"):
        CheckpointPolicy(filename="x" * 5000)


# -- monitor names and the default filename ------------------------------------------------


MONITORS_NO_PLACEHOLDER_CAN_HOLD = ["val:loss", "val{loss", "val}loss", "val!loss", "val[loss", "v" * 300, "val\x00loss"]


@pytest.mark.parametrize("monitor", MONITORS_NO_PLACEHOLDER_CAN_HOLD)
def test_default_filename_of_a_monitor_no_placeholder_can_hold(monitor):
    """Like Lightning's default, which never names the monitor: such a monitor still works."""
    policy = CheckpointPolicy(monitor=monitor)
    assert policy.filename_template == "epoch={epoch:03d}-step={step}"
    assert format_name(policy.filename_template, {"epoch": 3, "step": 9, monitor: 0.25}) == "epoch=003-step=9"


def test_monitor_no_placeholder_can_hold_saves_and_ranks(tmp_path, capsys):
    from checkpoint_hooks.core import Engine

    path = write(tmp_path, "monitor: 'val:loss'\ntop_k: 1\n")
    assert check_in_process(path, capsys)[0] == 0
    engine = Engine(load_policy(path, dirpath=str(tmp_path / "run")), extensions={"training_state": ".ckpt"})
    engine.start()
    for epoch, value in enumerate([0.5, 0.3, 0.4]):
        engine.save(epoch, epoch * 10, {"val:loss": value}, lambda item, target: open(target, "wb").write(b"x"))
    engine.close()
    kept = sorted(name for name in os.listdir(tmp_path / "run") if name.endswith(".ckpt"))
    assert kept == ["epoch=001-step=10.ckpt", "epoch=002-step=20.ckpt"]  # the best (0.3) and the last


def test_explicit_filename_with_a_monitor_no_placeholder_can_hold():
    assert CheckpointPolicy(monitor="val:loss", filename="e{epoch}").filename_template == "e{epoch}"


@pytest.mark.parametrize(
    "monitor, name",
    [
        ("val/loss", "epoch=003-val_loss=0.2500"),
        ("val_loss/dataloader_idx_0", "epoch=003-val_loss_dataloader_idx_0=0.2500"),
        ("val.loss", "epoch=003-val.loss=0.2500"),
        ("acc[0]", "epoch=003-acc[0]=0.2500"),
    ],
)
def test_lightning_metric_names_keep_working(monitor, name):
    policy = CheckpointPolicy(monitor=monitor)
    assert format_name(policy.filename_template, {"epoch": 3, "step": 9, monitor: 0.25}) == name


# -- huge values are shortened in every message ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"filename": "x{epoch}" * 20_000}, "(160000 characters)"),
        ({"filename": ["x"] * 1_000_000}, "(list of 1000000 items)"),
        ({"monitor": "val_loss", "top_k": -(10**5000)}, "<an integer of about 5001 digits>"),
        ({"top_k": 10**5000}, "<an integer of about 5001 digits>"),
        ({"k" * 100_000: 1}, "(100000 characters)"),
        ({"dirpath": " " * 100_000}, "(100000 characters)"),
    ],
)
def test_messages_show_at_most_a_short_part_of_a_value(kwargs, fragment):
    with pytest.raises(PolicyError) as info:
        CheckpointPolicy(**kwargs)
    message = str(info.value)
    assert fragment in message and len(message) < MAX_OUTPUT


def test_many_problems_are_counted_not_listed(tmp_path, capsys):
    path = write(tmp_path, "".join(f"unknown_{i}: 1\n" for i in range(10_000)))
    code, _out, err = check_in_process(path, capsys)
    assert code == 2 and "Traceback" not in err
    assert "... and 9995 more problems" in err and len(err) < 3 * MAX_OUTPUT
