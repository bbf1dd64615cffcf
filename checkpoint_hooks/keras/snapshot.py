"""A Keras 3 model's saved state, copied on the training thread and written to a file on another.

`take(model, archive=True)` reads what `model.save("x.keras")` would write (the config,
the metadata and every variable a `.keras` file holds, through Keras's own walk over
the model) into host memory; `Snapshot.write(path)` then produces that file on any
thread without touching the model. With `archive=False` it is what
`model.save_weights("x.weights.h5")` writes. The weights are written by Keras's own
`H5IOStore`, with the same groups, attributes and datasets in the same order. With
`buffers`, large variables are copied into arrays kept from the save before; with
TensorFlow they are read without an intermediate copy.

It uses private names of `keras.src.saving.saving_lib` (checked with Keras 3.15).
`available()` says whether they are there; `BestCheckpoint` writes on the training
thread when they are not.

Keras 3.15's `get_attr_skipset` stores the attribute names its walk passes over under
`saving_attr_skipset_<type>` but looks for `saving_attr_skiplist_<type>`, so every save
builds them again from new Layer, Optimizer (with its variables) and Metric objects:
about 6 ms of a 20 ms save of a small model here. `keep_skipsets()` (after each of
our saves and snapshots) also stores the sets Keras computed under the name it looks
for, in Keras's thread-local state, which `clear_session` resets. The sets are the
same; later saves in that thread, ours or not, only skip rebuilding them.
"""

from __future__ import annotations

import shutil
import weakref
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from keras.src import backend
from keras.src.backend.common import global_state

from checkpoint_hooks.core.buffers import REUSE_MIN_BYTES, HostBuffers

try:
    from keras.src.saving import saving_lib
except ImportError:  # pragma: no cover - a Keras without it
    saving_lib = None

# The object types get_attr_skipset knows.
_SKIPSET_TYPES = ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss", "Cross", "Feature")

_NAMES = (
    "_save_state",
    "_serialize_model_as_json",
    "_write_to_zip_recursively",
    "H5IOStore",
    "DiskIOStore",
    "_METADATA_FILENAME",
    "_CONFIG_FILENAME",
    "_VARS_FNAME_H5",
    "_ASSETS_DIRNAME",
)


def available() -> bool:
    """Whether this Keras has the saving functions a snapshot reuses."""
    return saving_lib is not None and all(hasattr(saving_lib, name) for name in _NAMES)


Entry = tuple[str, "dict[str, Any] | None", "list[tuple[str, np.ndarray]]"]


class _Recorder(saving_lib.H5IOStore if saving_lib is not None else object):  # type: ignore[misc]
    """Takes the place of a writing H5IOStore in Keras's walk: keeps each entry's values as numpy copies.

    It opens no file. The walk calls `make(path, metadata)` for every saveable, then
    `store[key] = variable` for each of its variables, in the order they are written. It is
    write-only: the reading side of H5IOStore is not there.
    """

    def __init__(self, buffers: HostBuffers[np.ndarray] | None = None) -> None:  # no h5 file: nothing of H5IOStore.__init__ applies
        self.mode = "w"
        self.entries: list[Entry] = []
        self._values: list[tuple[str, np.ndarray]] = []
        self._buffers = buffers

    def __bool__(self) -> bool:
        return True

    def make(self, path: str, metadata: dict[str, Any] | None = None) -> _Recorder:
        self._values = []
        self.entries.append((path, dict(metadata) if metadata else None, self._values))
        return self

    def __setitem__(self, key: str, value: Any) -> None:
        # A copy: some backends hand out numpy views of the live variable.
        self._values.append((key, _host_copy(value, self._buffers)))

    def close(self) -> None:
        pass


class _Assets(saving_lib.DiskIOStore if saving_lib is not None else object):  # type: ignore[misc]
    """A writing DiskIOStore whose temporary folder is made only when a layer has assets to save."""

    def __init__(self) -> None:
        self.mode = "w"
        self.archive = None
        self.root_path = saving_lib._ASSETS_DIRNAME
        self.tmp_dir: str | None = None
        self.working_dir: str | None = None
        self._remove: weakref.finalize[Any, Any] | None = None

    def make(self, path: str) -> str:
        if self.tmp_dir is None:
            saving_lib.DiskIOStore.__init__(self, saving_lib._ASSETS_DIRNAME, archive=None, mode="w")
            # Also removed when a snapshot that is never written is dropped (a failed save, another rank).
            assert self.tmp_dir is not None
            self._remove = weakref.finalize(self, shutil.rmtree, self.tmp_dir, ignore_errors=True)
        return str(saving_lib.DiskIOStore.make(self, path))

    def close(self) -> None:
        if self._remove is not None:
            self._remove()


@dataclass
class Snapshot:
    """What a save of the model writes, held in memory."""

    entries: list[Entry]
    config_json: str | None = None  # None: a weights file
    metadata_json: str | None = None
    assets: _Assets | None = None
    members: dict[str, bytes] = field(default_factory=dict)  # more members of the .keras zip, written last

    def write(self, path: str) -> None:
        """Write the `.keras` zip (or the `.weights.h5` file) at `path`, as Keras writes it; frees the assets' folder."""
        try:
            if self.config_json is None:
                self._replay(saving_lib.H5IOStore(path, mode="w"))
            else:
                with open(path, "wb") as f:
                    self._write_archive(f)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the temporary folder of the assets (a snapshot that is not written)."""
        if self.assets is not None:
            self.assets.close()

    def _write_archive(self, fileobj: IO[bytes]) -> None:
        assert self.config_json is not None and self.metadata_json is not None
        with zipfile.ZipFile(fileobj, "w") as archive:
            for name, text in ((saving_lib._METADATA_FILENAME, self.metadata_json), (saving_lib._CONFIG_FILENAME, self.config_json)):
                with archive.open(name, "w") as member:
                    member.write(text.encode())
            self._replay(saving_lib.H5IOStore(saving_lib._VARS_FNAME_H5, archive=archive, mode="w"))
            if self.assets is not None and self.assets.tmp_dir is not None:
                saving_lib._write_to_zip_recursively(archive, self.assets.working_dir, self.assets.root_path)
            for name, data in self.members.items():
                archive.writestr(name, data)

    def _replay(self, store: Any) -> None:
        try:
            for path, metadata, values in self.entries:
                store.make(path, metadata=metadata)
                for key, value in values:
                    store[key] = value
        except BaseException:
            store.archive = None  # a failed write adds no weights member
            raise
        finally:
            store.close()


def _host_copy(value: Any, buffers: HostBuffers[np.ndarray] | None) -> np.ndarray:
    """A copy of a variable's value in host memory: into an array of `buffers` when it is large."""
    view = _host_view(value)
    if buffers is None or view.nbytes < REUSE_MIN_BYTES:
        return np.array(view, copy=True)
    array = buffers.take(view.shape, view.dtype)
    np.copyto(array, view)
    return array


def _host_view(value: Any) -> np.ndarray:
    """The value as a numpy array, a view of it where the backend allows.

    A TensorFlow variable is read once (`read_value`, a consistent value: an assign
    that follows copies the variable's buffer first) and viewed in place; Keras's
    `convert_to_numpy` would copy it twice more.
    """
    if backend.backend() == "tensorflow":
        read = getattr(getattr(value, "value", None), "read_value", None)
        if read is not None:
            return np.asarray(read())
    return np.asarray(backend.convert_to_numpy(value))


def take(model: Any, archive: bool = True, buffers: HostBuffers[np.ndarray] | None = None) -> Snapshot:
    """Copy what `model.save(".keras")` (archive) or `model.save_weights(".weights.h5")` would write, now.

    Large variables go into arrays of `buffers` when given (see `HostBuffers`).
    """
    config_json = metadata_json = None
    if archive:
        config_json, metadata_json = saving_lib._serialize_model_as_json(model)
    recorder = _Recorder(buffers)
    assets = _Assets() if archive else None
    try:
        saving_lib._save_state(
            model, weights_store=recorder, assets_store=assets, inner_path="", visited_saveables=set()
        )
    except BaseException:
        if assets is not None:
            assets.close()
        raise
    keep_skipsets()
    return Snapshot(recorder.entries, config_json, metadata_json, assets)


def keep_skipsets() -> None:
    """Store the skip sets Keras computed under the name its lookup reads (see the module docstring)."""
    for obj_type in _SKIPSET_TYPES:
        computed = global_state.get_global_attribute(f"saving_attr_skipset_{obj_type}")
        if computed is not None and global_state.get_global_attribute(f"saving_attr_skiplist_{obj_type}") is None:
            global_state.set_global_attribute(f"saving_attr_skiplist_{obj_type}", computed)
