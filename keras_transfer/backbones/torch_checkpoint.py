"""Reads PyTorch checkpoints (state dicts) into numpy, without torch.

Both `torch.save` formats are read: the legacy stream (a sequence of pickles
followed by raw storages) and the zip archive (`archive/data.pkl` plus one file
per storage). Pickle can run arbitrary code, so the unpickler here resolves
only the few globals a state dict needs and refuses every other one.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile

import numpy as np

# The magic number at the start of a legacy `torch.save` stream
# (torch/serialization.py: MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# torch storage class name -> numpy dtype (little-endian).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """Raised when a checkpoint references a global that a state dict never needs."""


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.array = dtype, numel, None


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        data = self.storage.array
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=[s * itemsize for s in self.stride],
        )
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
    return _TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `OrderedDict`, `_rebuild_tensor_v2` and `torch.*Storage`."""

    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"Refusing to load global '{module}.{name}' from a checkpoint: a state dict "
            "only needs tensors. The file may be malicious or not a plain state dict."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"Unexpected persistent id in checkpoint: {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"Unexpected storage type: {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype, int(numel))
        return self._storages[key]


def _state_dict_to_numpy(obj) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(f"Checkpoint does not hold a state dict. Received: {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {
        str(key): value.to_numpy() for key, value in obj.items() if isinstance(value, _TensorRef)
    }


def _read_legacy(file) -> dict[str, np.ndarray]:
    storages: dict[str, _Storage] = {}

    def load():
        return _RestrictedUnpickler(file, storages).load()

    if load() != _LEGACY_MAGIC:
        raise ValueError("Not a PyTorch checkpoint (bad magic number).")
    load()  # protocol version
    load()  # sys info
    state = load()
    keys = load()
    for key in keys:
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", file.read(8))
        raw = file.read(numel * storage.dtype.itemsize)
        if len(raw) != numel * storage.dtype.itemsize:
            raise ValueError("Truncated PyTorch checkpoint.")
        storage.array = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return _state_dict_to_numpy(state)


def _read_zip(path) -> dict[str, np.ndarray]:
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickle_name = next((n for n in names if n.endswith("/data.pkl")), None)
        if pickle_name is None:
            raise ValueError(f"No data.pkl in checkpoint archive {path!r}.")
        prefix = pickle_name[: -len("data.pkl")]
        with archive.open(pickle_name) as file:
            state = _RestrictedUnpickler(file, storages).load()
        for key, storage in storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            storage.array = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return _state_dict_to_numpy(state)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a PyTorch state dict as `{name: numpy array}`, without torch.

    Only the globals a state dict needs are resolved; a checkpoint that
    references anything else (e.g. `os.system`) raises `UnsafeCheckpointError`
    before any of it runs.

    Args:
        path: a `.pth`/`.pt` file written by `torch.save(model.state_dict())`.

    Returns:
        Dict of parameter/buffer name to numpy array (PyTorch layout).

    Raises:
        FileNotFoundError: if `path` does not exist.
        UnsafeCheckpointError: for a checkpoint that references other globals.

    Example:
    >>> import os, pickle, tempfile
    >>> from keras_transfer.backbones.torch_checkpoint import load_torch_state_dict
    >>> class Evil:
    ...     def __reduce__(self):
    ...         return (os.system, ("echo pwned",))
    >>> bad = os.path.join(tempfile.mkdtemp(), "bad.pth")
    >>> with open(bad, "wb") as f:
    ...     pickle.dump(Evil(), f, protocol=2)
    >>> load_torch_state_dict(bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    keras_transfer.backbones.torch_checkpoint.UnsafeCheckpointError: Refusing to load global ...
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found. Received: path={path!r}")
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as file:
        return _read_legacy(file)
