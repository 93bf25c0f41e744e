"""Read ``torch.save`` files into numpy arrays without importing torch.

Both of torch's layouts are understood: the zip archive (torch >= 1.6:
``<name>/data.pkl`` plus one raw file per storage) and the legacy stream
(magic number, protocol, sys info, the pickle, then the storages inline; the
original GPT-2 ``pytorch_model.bin`` files are in this layout). Only tensors,
containers and plain values are rebuilt; any other global in the pickle is
refused, so loading a checkpoint cannot run code.
"""
import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Dict

import numpy as np

__all__ = ["load_torch_file", "TorchFileError"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class TorchFileError(ValueError):
    """The file is not a torch checkpoint we can read; the message names the file."""


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat storage: raw bytes and an element dtype (bfloat16 is widened to float32)."""

    def __init__(self, raw: bytes, dtype):
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            self.array = bits.view(np.float32)
        else:
            self.array = np.frombuffer(raw, dtype=dtype)


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    arr = storage.array
    size, stride = tuple(size), tuple(stride)
    if not size:
        return arr[offset:offset + 1].reshape(()).copy()
    item = arr.itemsize
    view = np.lib.stride_tricks.as_strided(arr[offset:], shape=size, strides=[s * item for s in stride])
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, fileobj, load_storage, path):
        super().__init__(fileobj)
        self._load_storage = load_storage
        self._path = path
        self._cache = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("dtype"):
            return name
        raise TorchFileError(f"{self._path}: refusing to unpickle {module}.{name} "
                             "(only tensors and plain containers are loaded)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchFileError(f"{self._path}: unknown persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.uint8
        cache_key = (key, repr(pid[5:]))
        if cache_key not in self._cache:
            self._cache[cache_key] = self._load_storage(key, dtype, pid)
        return self._cache[cache_key]


def _load_zip(path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise TorchFileError(f"{path}: zip file without data.pkl; not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]

        def load_storage(key, dtype, _pid):
            return _Storage(zf.read(f"{prefix}data/{key}"), dtype)

        with zf.open(pkl[0]) as f:
            return _Unpickler(io.BytesIO(f.read()), load_storage, path).load()


def _load_legacy(path) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)

    def plain_load():
        return _Unpickler(stream, None, path).load()

    if plain_load() != _LEGACY_MAGIC:
        raise TorchFileError(f"{path}: not a torch checkpoint (bad magic number)")
    plain_load()  # protocol version
    plain_load()  # sys info
    pending = {}

    def defer_storage(key, dtype, pid):
        pending[key] = (dtype, pid)
        return _Storage(b"", np.uint8)  # placeholder, replaced below

    storages = {}
    result_stream_pos = stream.tell()
    # First pass only to learn the storage keys and where their data starts.
    _Unpickler(stream, defer_storage, path).load()
    keys = _Unpickler(stream, None, path).load()
    for key in keys:
        dtype = pending[str(key)][0]
        item = np.dtype(np.uint16 if dtype == "bfloat16" else dtype).itemsize
        (numel,) = struct.unpack("<q", stream.read(8))
        storages[str(key)] = _Storage(stream.read(numel * item), dtype)
    # Second pass over the main pickle with the real storages.
    stream.seek(result_stream_pos)
    def real_storage(key, dtype, pid):
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return storages[key]
        _view_key, offset, numel = view  # an old-style storage view into the root storage
        sub = _Storage(b"", np.uint8)
        sub.array = storages[key].array[offset:offset + numel]
        return sub

    return _Unpickler(stream, real_storage, path).load()


def load_torch_file(path) -> Dict[str, Any]:
    """Return the object ``torch.save`` wrote, with tensors as numpy arrays."""
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as e:
        raise TorchFileError(f"{path}: unreadable torch checkpoint ({type(e).__name__}: {e})") from e
