"""CIFAR-10 in its two official versions (Krizhevsky, "Learning Multiple Layers of Features from
Tiny Images", 2009; https://www.cs.toronto.edu/~kriz/cifar.html).

Python version, folder ``cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5`` (train),
``test_batch`` (test) and ``batches.meta``. Each batch is a pickle, written by Python 2's
cPickle (protocol 2), of a dict with the keys ``data`` (a ``uint8`` array of 10000 x 3072: per
row the red, then the green, then the blue 32 x 32 plane, each row-major), ``labels`` (a list of
ints 0..9), ``batch_label`` and ``filenames``.

Binary version, folder ``cifar-10-batches-bin``: ``data_batch_1.bin`` .. ``data_batch_5.bin``
and ``test_batch.bin``, each 10000 records of one label byte followed by the 3072 pixel bytes in
the same plane order.

A pickle can run any code while it loads, so the batches are read with a restricted unpickler.
The genuine files name exactly three globals: ``numpy.core.multiarray._reconstruct``,
``numpy.ndarray`` and ``numpy.dtype`` (a copy re-saved by NumPy 2 with protocol 3 or later
spells the first ``numpy._core.multiarray._reconstruct``). Those names resolve to stand-ins
defined here, not to NumPy: the stand-ins accept only what an array of unsigned bytes is made
of and build it with ``np.frombuffer``, so no NumPy constructor sees a value from the file.
Every other global is refused. A copy re-saved by Python 3 with protocol 2 also needs
``_codecs.encode`` and is refused too; re-save it with protocol 3 or later. Before unpickling,
``pickletools`` walks the opcodes, so that a length or memo index that the file cannot back is
refused before anything is allocated.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from goodnet.data._common import check_split, file_size, image_data, labels_tensor
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError

_PIXELS = 3 * 32 * 32
_CLASSES = 10
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin")
_NDARRAY = object()  # what the name numpy.ndarray resolves to: only a marker for _reconstruct


class _Dtype:
    """Stands in for ``numpy.dtype``: admits the unsigned byte type and nothing else."""

    def __init__(self, name: object, align: object = 0, copy: object = 1) -> None:
        if name not in (b"u1", "u1"):
            raise GoodnetError(f"array type {name!r} (only u1 is admitted)")

    def __setstate__(self, state: object) -> None:
        # Byte order and alignment mean nothing for single bytes; the state is not used.
        if not isinstance(state, tuple):
            raise GoodnetError("malformed array type")


class _Array:
    """Stands in for ``numpy.core.multiarray._reconstruct`` and the array it returns.

    The pickle calls it with ``(ndarray, (0,), b"b")``, then hands ``__setstate__`` the shape,
    the type and the raw bytes, from which the real array is built. Being a class (not a
    function), it gives a malicious BUILD opcode no attribute to overwrite.
    """

    array: np.ndarray | None = None

    def __init__(self, subtype: object, shape: object, typecode: object) -> None:
        if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
            raise GoodnetError("malformed array")

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise GoodnetError("malformed array state")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise GoodnetError(f"malformed array shape {shape!r}")
        if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes | bytearray):
            raise GoodnetError("array state without a byte type and raw bytes")
        if len(raw) != math.prod(shape):
            raise GoodnetError(f"array of shape {shape} with {len(raw)} bytes")
        self.array = np.frombuffer(raw, np.uint8).reshape(shape, order="F" if fortran else "C")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals of a genuine batch, each to a stand-in defined here."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise GoodnetError(f"global {module}.{name}") from None


def read_cifar_pickle(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` ``uint8`` and labels of one batch of the Python version."""
    path = Path(path)
    file_size(path)
    try:
        raw = path.read_bytes()
        _check_opcodes(raw)
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except GoodnetError as err:
        raise GoodnetError(f"{path}: refusing to load: {err}") from None
    except Exception as err:  # a malformed pickle can raise almost any exception
        raise GoodnetError(f"{path}: not a CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise GoodnetError(f"{path}: not a CIFAR-10 batch (holds {type(batch).__name__})")
    data, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, _Array) or data.array is None or not isinstance(labels, list):
        raise GoodnetError(f"{path}: not a CIFAR-10 batch (needs an array 'data' and a list "
                           f"'labels')")
    images = data.array
    if images.ndim != 2 or images.shape[1] != _PIXELS:
        raise GoodnetError(f"{path}: data must be N x {_PIXELS}, got {images.shape}")
    if len(labels) != len(images) or not all(type(label) is int for label in labels):
        raise GoodnetError(f"{path}: needs one integer label per image, got {len(labels)} "
                           f"labels for {len(images)} images")
    # Checked as Python ints: a label such as 2**70 overflows any NumPy integer type.
    outside = next((i for i, label in enumerate(labels) if not 0 <= label < _CLASSES), None)
    if outside is not None:
        raise GoodnetError(f"{path}: labels must lie in [0, {_CLASSES - 1}]; the label of "
                           f"image {outside} does not")
    return images.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


def _check_opcodes(raw: bytes) -> None:
    """Refuse lengths and memo indices the file cannot back, before the unpickler allocates."""
    for opcode, argument, _ in pickletools.genops(io.BytesIO(raw)):
        if "PUT" in opcode.name and isinstance(argument, int) and argument > len(raw):
            raise GoodnetError(f"memo index {argument} beyond the file's size")


def read_cifar_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` ``uint8`` and labels of one batch of the binary version."""
    path = Path(path)
    size = file_size(path)
    if size == 0 or size % (1 + _PIXELS):
        raise GoodnetError(f"{path}: {size} bytes is not a whole number of "
                           f"{1 + _PIXELS}-byte records")
    try:
        records = np.fromfile(path, np.uint8).reshape(-1, 1 + _PIXELS)
    except (OSError, ValueError) as err:
        raise GoodnetError(f"{path}: cannot read ({err})") from None
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def cifar_files(folder: str | Path, split: str) -> list[Path]:
    """The batch files of ``split`` in ``folder``, the Python version if both are there.

    ``folder`` is ``cifar-10-batches-py`` or ``cifar-10-batches-bin``, or a folder holding one.
    """
    names = _BATCHES[check_split(split)]
    folder = Path(folder)
    for candidate in (folder, *(folder / sub for sub in _FOLDERS)):
        for suffix in ("", ".bin"):
            files = [candidate / f"{name}{suffix}" for name in names]
            if any(path.exists() for path in files):  # the readers refuse all but regular files
                missing = [path.name for path in files if not path.exists()]
                if missing:
                    raise GoodnetError(f"{candidate}: incomplete CIFAR-10, missing "
                                       f"{', '.join(missing)}")
                return files
    raise GoodnetError(f"{folder}: no CIFAR-10 batches (expected {names[0]} or {names[0]}.bin, "
                       f"here or in {' or '.join(_FOLDERS)})")


def load_cifar10(folder: str | Path, split: str) -> ImageData:
    """CIFAR-10 ``split`` from the Python or binary version in ``folder``.

    Returns:
        Images ``(N, 3, 32, 32)`` ``uint8``, channels in the order red, green, blue, named
        ``"cifar10:<split>"``.
    """
    files = cifar_files(folder, split)
    read = read_cifar_binary if files[0].suffix == ".bin" else read_cifar_pickle
    parts = [read(path) for path in files]
    labels = torch.cat([labels_tensor(part_labels, _CLASSES, path)
                        for (_, part_labels), path in zip(parts, files, strict=True)])
    images = np.concatenate([part_images for part_images, _ in parts])
    return image_data(images, labels, _CLASSES, f"cifar10:{split}", files[0].parent)
