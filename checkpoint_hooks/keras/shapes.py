"""Why a checkpoint does not load into a model: the first variable whose shape changed since the save.

Keras's own error for a changed model lists every object that could not be loaded,
with the values of the first variable: dozens of lines in which the shapes are hard
to find. `first_mismatch` walks the model as Keras's saving does (the same walk
`load_weights` follows, so the paths are those of the file) and compares each
variable's shape with the one stored under its path. It reads only the file's
metadata, and runs only after a load failed.

It uses private names of `keras.src.saving.saving_lib` (checked with Keras 3.15);
without them, or for a file it cannot read (legacy `.h5` models, `.npz` weights), it
finds nothing and the caller falls back to Keras's message.
"""

from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass
from typing import Any

try:
    from keras.src.saving import saving_lib
except ImportError:  # pragma: no cover - a Keras without it
    saving_lib = None


@dataclass(frozen=True)
class Mismatch:
    """A variable whose shape in the checkpoint is not its shape in the model."""

    name: str
    saved: tuple[int, ...]
    current: tuple[int, ...]


class _Walk(saving_lib.H5IOStore if saving_lib is not None else object):  # type: ignore[misc]
    """Takes the place of a writing H5IOStore in Keras's saving walk: notes where each variable goes, copies nothing."""

    def __init__(self) -> None:  # no h5 file: nothing of H5IOStore.__init__ applies
        self.mode = "w"
        self.found: list[tuple[str, str, Any]] = []
        self._path = ""

    def __bool__(self) -> bool:
        return True

    def make(self, path: str, metadata: dict[str, Any] | None = None) -> _Walk:
        self._path = path
        return self

    def __setitem__(self, key: str, value: Any) -> None:
        self.found.append((self._path, key, value))

    def close(self) -> None:
        pass


def first_mismatch(model: Any, path: str) -> Mismatch | None:
    """The first variable of `model` (in Keras's saving order) stored in `path` with another shape; None if none is found.

    Args:
        model: the model the checkpoint was loaded into.
        path: a `.keras` archive or a `.weights.h5` file.
    """
    if saving_lib is None:
        return None
    with contextlib.suppress(Exception):  # only a diagnosis: any surprise leaves Keras's own message
        walk = _Walk()
        saving_lib._save_state(model, weights_store=walk, assets_store=None, inner_path="", visited_saveables=set())
        with _open_weights(path) as weights:
            return _compare(walk.found, weights)
    return None


@contextlib.contextmanager
def _open_weights(path: str) -> Any:
    """The h5 file of the weights: the member of a `.keras` archive, or the `.weights.h5` file itself."""
    import h5py

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive, archive.open(saving_lib._VARS_FNAME_H5) as member:
            with h5py.File(member, "r") as weights:
                yield weights
    else:
        with h5py.File(path, "r") as weights:
            yield weights


def _compare(found: list[tuple[str, str, Any]], weights: Any) -> Mismatch | None:
    for entry, key, variable in found:
        group = f"{entry}/vars" if entry else "vars"
        if group not in weights or key not in weights[group]:
            continue
        saved = tuple(int(n) for n in weights[group][key].shape)
        current = tuple(int(n) for n in variable.shape)
        if saved != current:
            return Mismatch(str(getattr(variable, "path", None) or f"{entry}/{key}"), saved, current)
    return None
