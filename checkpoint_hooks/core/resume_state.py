"""The resume payload: one versioned record, inside every resumable checkpoint, of where training was.

It holds the epoch, the global step, whether the save came before the epoch finished
(and after how many of its batches), the random generator states of every process
(Python's and NumPy's here, the framework's own beside them), and a few fields of the
adapter's own. It is plain data (numbers, strings, lists, dicts): each adapter stores it
where its format has room (a key of Lightning's or PyTorch's checkpoint dict, a member of
a `.keras` zip, a key of Paddle's `.pdopt`), and it is never pickled by us.

`read` also understands what earlier releases wrote (a Keras zip member, a key of Paddle's
`.pdopt`, Lightning's per-rank RNG list), so their checkpoints keep resuming.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FORMAT = "checkpoint_hooks.resume"
VERSION = 1
# What earlier releases wrote.
KERAS_V1_FORMAT = "checkpoint_hooks.keras"


@dataclass
class ResumeState:
    """Where training was when a checkpoint was saved.

    Args:
        epoch: the 0-based epoch it was saved in (None: the file does not say).
        step: the global optimizer step.
        mid_epoch: saved before `epoch` finished.
        epoch_step: with `mid_epoch`, how many batches of `epoch` were trained.
        rng: one dict of random states per process, by rank.
        extra: the adapter's own fields (parameter names, a learning rate, seed states).
    """

    epoch: int | None
    step: int = 0
    mid_epoch: bool = False
    epoch_step: int | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "mid_epoch": self.mid_epoch,
            "epoch_step": self.epoch_step,
            "rng": self.rng,
            "extra": self.extra,
        }

    def rng_of(self, rank: int) -> dict[str, Any] | None:
        """The random states saved by `rank` (rank zero's for a rank that did not exist then)."""
        if not self.rng:
            return None
        return self.rng[rank] if rank < len(self.rng) else self.rng[0]


def read(data: Any) -> ResumeState | None:
    """The payload in `data`, in this version's layout or an earlier release's; None when there is none."""
    if isinstance(data, Mapping):
        if data.get("format") == FORMAT:
            return _read_current(data)
        if data.get("format") == KERAS_V1_FORMAT:
            return _read_keras_v1(data)
        if "global_step" in data:
            return _read_paddle_v1(data)
        return None
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and data and isinstance(data[0], Mapping):
        # Lightning's per-rank RNG list: the epoch and step are in Lightning's own loop state
        return ResumeState(epoch=None, rng=[dict(r) for r in data])
    return None


def _int(value: Any, default: int | None = None) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _read_current(data: Mapping[str, Any]) -> ResumeState:
    rng = data.get("rng")
    extra = data.get("extra")
    return ResumeState(
        epoch=_int(data.get("epoch")),
        step=_int(data.get("step"), 0) or 0,
        mid_epoch=bool(data.get("mid_epoch", False)),
        epoch_step=_int(data.get("epoch_step")),
        rng=[dict(r) for r in rng if isinstance(r, Mapping)] if isinstance(rng, list) else [],
        extra=dict(extra) if isinstance(extra, Mapping) else {},
    )


def _read_keras_v1(data: Mapping[str, Any]) -> ResumeState:
    rng: dict[str, Any] = {}
    if "torch_rng_state" in data:
        rng["torch"] = data["torch_rng_state"]
    if "torch_cuda_rng_states" in data:
        rng["torch_cuda"] = data["torch_cuda_rng_states"]
    extra = {"seed_states": data["seed_states"]} if "seed_states" in data else {}
    return ResumeState(
        epoch=_int(data.get("epoch")),
        step=_int(data.get("step"), 0) or 0,
        mid_epoch=bool(data.get("mid_epoch", False)),
        epoch_step=_int(data.get("epoch_batches")),
        rng=[rng] if rng else [],
        extra=extra,
    )


def _read_paddle_v1(data: Mapping[str, Any]) -> ResumeState:
    extra = {k: data[k] for k in ("param_names", "learning_rate", "world_size") if k in data}
    # Pickled by earlier releases; only Paddle's adapter, which loads that pickled .pdopt anyway, reads it.
    rng = [{"paddle_pickle": data["rng"]}] if isinstance(data.get("rng"), bytes) else []
    return ResumeState(
        epoch=_int(data.get("epoch")),
        step=_int(data.get("global_step"), 0) or 0,
        mid_epoch=bool(data.get("mid_epoch", False)),
        epoch_step=_int(data.get("epoch_step")),
        rng=rng,
        extra=extra,
    )


# -- random states of the libraries every framework shares ------------------------------


def host_rng_state() -> dict[str, Any]:
    """Python's and NumPy's global random states, as plain data."""
    version, inner, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(inner), gauss]}
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, np.asarray(keys).astype("int64").tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_host_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `host_rng_state`'s values (and the tuples with arrays or tensors earlier releases saved)."""
    python = state.get("python")
    if python is not None:
        version, inner, gauss = python
        random.setstate((version, tuple(int(x) for x in inner), gauss))
    saved = state.get("numpy")
    np = _numpy()
    if saved is not None and np is not None:
        name, keys, pos, has_gauss, cached = saved
        keys = keys.numpy() if hasattr(keys, "numpy") else keys  # a torch tensor in Lightning's v1 files
        np.random.set_state((name, np.asarray(keys).astype(np.uint32), int(pos), int(has_gauss), float(cached)))


def encode_bytes(data: bytes) -> str:
    """Bytes (a generator's raw state) as text that JSON and `torch.load(weights_only=True)` accept."""
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # a framework without numpy has no numpy state to keep
        return None
    return numpy
