"""Resume never unpickles code: planted .pdopt/.pdparams files are refused before paddle.load runs them."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from dataclasses import replace

import numpy as np
import paddle
import pytest

from checkpoint_hooks.core.directory import CheckpointDirectory
from checkpoint_hooks.core.errors import CheckpointError
from checkpoint_hooks.core.hashing import checksum_stream
from checkpoint_hooks.paddle import STATE_KEY, BestCheckpoint
from checkpoint_hooks.paddle.safe_load import STATE_DICT_GLOBALS, UnsafeCheckpointError, check_pickle, pickle_globals
from tests.paddle.toy import Recorder, Regression, regression_model

NEWEST = "epoch=001-step=8"
OLDER = "epoch=000-step=4"

# -- hand-written pickles, opcode by opcode -------------------------------------------------


def text(value: str) -> bytes:
    """SHORT_BINUNICODE: push a string."""
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


MEMOIZE, POP, TUPLE1, REDUCE, STACK_GLOBAL = b"\x94", b"0", b"\x85", b"R", b"\x93"


def binget(index: int) -> bytes:
    return b"h" + bytes([index])


def in_a_dict(call: bytes) -> bytes:
    """A pickled {"x": <call>}: the shape of a state dict with one planted value."""
    return b"\x80\x04}" + text("x") + call + b"s."


def os_system(command: str) -> bytes:
    return in_a_dict(b"cos\nsystem\n" + text(command) + TUPLE1 + REDUCE)


def posix_system_through_the_memo(command: str) -> bytes:
    """posix.system by STACK_GLOBAL, its two names fetched from the memo after a decoy pair was pushed."""
    names = text("posix") + MEMOIZE + POP + text("system") + MEMOIZE + POP  # memo 0, 1; stack back to the dict
    decoy = text("numpy") + text("ndarray") + POP + POP
    return in_a_dict(names + decoy + binget(0) + binget(1) + STACK_GLOBAL + text(command) + TUPLE1 + REDUCE)


def builtins_eval(command: str) -> bytes:
    source = f"__import__('os').system({command!r})"
    return in_a_dict(b"cbuiltins\neval\n" + text(source) + TUPLE1 + REDUCE)


def getattr_of_os(command: str) -> bytes:
    """getattr(__import__('os'), 'system')(command): REDUCE of builtins.getattr."""
    os_module = b"cbuiltins\n__import__\n" + text("os") + TUPLE1 + REDUCE
    system = b"cbuiltins\ngetattr\n(" + os_module + text("system") + b"tR"
    return in_a_dict(system + text(command) + TUPLE1 + REDUCE)


PLANTED = {
    "os.system": os_system,
    "posix.system": posix_system_through_the_memo,
    "builtins.eval": builtins_eval,
    "builtins.getattr": getattr_of_os,
}

# -- a real checkpoint directory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A directory a real fit wrote: two epochs, every checkpoint kept."""
    directory = str(tmp_path_factory.mktemp("trained") / "ck")
    regression_model().fit(Regression(), batch_size=8, epochs=2, verbose=0, shuffle=False,
                           callbacks=[BestCheckpoint(dirpath=directory, top_k=-1)])
    return directory


def copy_of(trained: str, tmp_path) -> str:
    directory = str(tmp_path / "ck")
    shutil.copytree(trained, directory)
    return directory


def resume(directory: str, epochs: int = 3, **options) -> tuple[BestCheckpoint, Recorder]:
    callback = BestCheckpoint(dirpath=directory, top_k=-1, **options)
    recorder = Recorder()
    regression_model(seed=4).fit(Regression(), batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                                 callbacks=[callback, recorder])
    return callback, recorder


def plant(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def rewrite_index(directory: str) -> None:
    """What whoever planted a file can do as well: record its size and checksum in the index."""
    store = CheckpointDirectory(directory)
    manifest = store.read_manifest()
    assert manifest is not None
    for record in manifest.records:
        files = []
        for entry in record.files:
            with open(os.path.join(directory, entry.path), "rb") as f:
                checksum, size = checksum_stream(f)
            files.append(replace(entry, checksum=checksum, bytes=size))
        manifest.put(replace(record, files=tuple(files)))
    store.commit(manifest)


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_a_planted_pdopt_is_refused_at_resume_and_never_runs(trained, tmp_path, kind):
    directory = copy_of(trained, tmp_path)
    marker = tmp_path / "MARKER"
    planted = os.path.join(directory, NEWEST + ".pdopt")
    plant(planted, PLANTED[kind](f"touch {marker}"))
    rewrite_index(directory)

    with pytest.raises(UnsafeCheckpointError) as caught:
        resume(directory)

    message = str(caught.value)
    assert isinstance(caught.value, CheckpointError)
    assert "\n" not in message
    assert planted in message and repr(kind) in message and "was not loaded" in message
    assert not marker.exists()


def test_the_planted_pickles_do_run_code_when_unpickled(tmp_path):
    """The fixtures are live: an unchecked load would have created the marker (what the tests above rule out)."""
    for kind, make in PLANTED.items():
        marker = tmp_path / f"MARKER-{kind}"
        pickle.loads(make(f"touch {marker}"))
        assert marker.exists(), kind


def test_a_planted_pdparams_is_refused_too(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    marker = tmp_path / "MARKER"
    planted = os.path.join(directory, NEWEST + ".pdparams")
    plant(planted, os_system(f"touch {marker}"))
    rewrite_index(directory)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*epoch=001-step=8\.pdparams: .*'os\.system'"):
        resume(directory)
    assert not marker.exists()


def test_a_planted_file_that_fails_its_checksum_is_skipped_unrun(trained, tmp_path, caplog):
    directory = copy_of(trained, tmp_path)
    marker = tmp_path / "MARKER"
    plant(os.path.join(directory, NEWEST + ".pdopt"), os_system(f"touch {marker}"))
    with caplog.at_level(logging.WARNING, logger="checkpoint_hooks"):
        callback, recorder = resume(directory)
    assert not marker.exists()
    assert any("skipping checkpoint" in r.getMessage() and NEWEST in r.getMessage() for r in caplog.records)
    assert callback.resumed_from is not None and callback.resumed_from.name == OLDER
    assert recorder.trained == [1, 2]


def test_random_states_pickled_by_an_earlier_release_are_checked_too(trained, tmp_path):
    """Versions 1 and 2 of the payload held pickled random states: a planted one is refused, not run."""
    directory = copy_of(trained, tmp_path)
    marker = tmp_path / "MARKER"
    path = os.path.join(directory, NEWEST + ".pdopt")
    optimizer = paddle.load(path)
    optimizer[STATE_KEY] = {"version": 2, "epoch": 1, "global_step": 8, "rng": builtins_eval(f"touch {marker}")}
    paddle.save(optimizer, path)
    rewrite_index(directory)
    with pytest.raises(UnsafeCheckpointError, match=r"epoch=001-step=8\.pdopt: its pickle calls 'builtins\.eval'"):
        resume(directory)
    assert not marker.exists()


# -- the check itself ------------------------------------------------------------------------


def test_a_stack_global_whose_names_cannot_be_known_unrun_is_refused():
    # The stack holds "posix", "system" at STACK_GLOBAL, but a POP came last: nothing to read statically.
    data = in_a_dict(text("posix") + text("system") + text("junk") + POP + STACK_GLOBAL + text("true") + TUPLE1 + REDUCE)
    with pytest.raises(UnsafeCheckpointError, match="cannot be checked unrun"):
        check_pickle(data, "f.pdopt")


def test_extension_registry_and_persistent_ids_are_refused():
    with pytest.raises(UnsafeCheckpointError, match="extension-registry"):
        check_pickle(in_a_dict(b"\x82\x01"), "f.pdopt")  # EXT1 1
    with pytest.raises(UnsafeCheckpointError, match="persistent id"):
        check_pickle(in_a_dict(text("x") + b"Q"), "f.pdopt")  # BINPERSID


def test_a_file_that_is_not_a_pickle_is_refused():
    with pytest.raises(UnsafeCheckpointError, match="not the pickle paddle.save writes"):
        check_pickle(b"\x00 a raw tensor file", "f.pdparams")


def test_what_paddle_save_writes_for_state_dicts_passes(tmp_path):
    """Model, optimizer (with master weights in a nested dict), LR scheduler with a NumPy scalar, plain data."""
    net = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.BatchNorm1D(3))
    plateau = paddle.optimizer.lr.ReduceOnPlateau(0.1)
    plateau.step(np.float32(0.5))
    optimizer = paddle.optimizer.AdamW(plateau, parameters=net.parameters())
    net(paddle.randn([2, 4])).sum().backward()
    optimizer.step()
    state = dict(optimizer.state_dict())
    state["master_weights"] = {p.name: p for p in net.parameters()}  # tensors in a nested dict: (tuple, ...)
    seen: set[tuple[str, str]] = set()
    for name, value in {"net": net.state_dict(), "opt": state, "lr": {"LR_Scheduler": plateau.state_dict()}}.items():
        path = str(tmp_path / name)
        paddle.save(value, path)
        with open(path, "rb") as f:
            data = f.read()
        check_pickle(data, path)
        seen.update(pickle_globals(data, path))
    assert seen <= STATE_DICT_GLOBALS
    assert {("builtins", "tuple"), ("numpy", "ndarray"), ("numpy", "dtype")} <= seen
    assert {name for _module, name in seen} == {"tuple", "ndarray", "dtype", "scalar", "_reconstruct"}


def test_an_attribute_path_below_an_allowed_global_is_refused():
    """Protocol 4 resolves dotted names: numpy.ndarray.tofile would write any file. Pairs are compared whole."""
    data = in_a_dict(text("numpy") + text("ndarray.tofile") + STACK_GLOBAL + b")" + REDUCE)
    with pytest.raises(UnsafeCheckpointError, match=r"its pickle calls 'numpy\.ndarray\.tofile'"):
        check_pickle(data, "f.pdopt")


def test_a_dtype_rebuilt_with_its_object_flag_cleared_is_refused_before_use(tmp_path):
    # Only allowed globals (numpy dtype and scalar): the dtype's state clears the flag that says it holds
    # objects, so numpy would take the 8 bytes for a pointer and follow it on the first use of the value.
    import warnings

    from checkpoint_hooks.paddle.safe_load import paddle_load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forged = np.dtype("V8")
        state = list(np.dtype([("a", "O")]).__reduce__()[2])
        state[-1] = 0
        forged.__setstate__(tuple(state))
        value = np.core.multiarray.scalar(forged, b"\x41" * 8)
        data = pickle.dumps({"LR_Scheduler": {"last_epoch": 3, "best": value}}, protocol=4)
    check_pickle(data, "x.pdopt")  # the globals alone pass: the check after loading catches it
    path = tmp_path / "x.pdopt"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="not a plain number") as caught:
        paddle_load(str(path))
    assert "\n" not in str(caught.value)
