"""IDX files, the format MNIST and Fashion-MNIST are distributed in.

The official format (LeCun, Cortes and Burges, "The MNIST database of handwritten digits"):
a 4-byte magic number -- two zero bytes, a type code and the number of dimensions -- then one
big-endian unsigned 32-bit size per dimension, then the values in C order, big-endian. Type
codes: 0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64. A data set is four files, ``train-images-idx3-ubyte`` (N, 28, 28),
``train-labels-idx1-ubyte`` (N,), and the same with ``t10k`` for the test split, usually
gzipped (``.gz``); plain and gzipped files are both read.

Sizes declared in a header are checked before anything is allocated: a plain file must hold
exactly the declared number of bytes, and a gzipped file may not declare more than deflate's
largest expansion (1032 to 1) of its compressed size. A gzipped file is then read in blocks, so
memory grows only with data that is really there.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from goodnet.data._common import check_split, file_size, image_data, labels_tensor
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_DEFLATE_RATIO = 1032
_BLOCK = 1 << 24
_PREFIXES = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (plain, or gzipped when the name ends in ``.gz``).

    Returns:
        An array of the file's shape and type, in native byte order.
    """
    path = Path(path)
    size = file_size(path)
    gzipped = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as stream:
            dtype, shape = _read_header(stream, path)
            nbytes = math.prod(shape) * dtype.itemsize
            if gzipped and nbytes > _MAX_DEFLATE_RATIO * size:
                raise GoodnetError(f"{path}: header declares {nbytes} bytes of data, more than "
                                   f"a {size}-byte gzip file can hold")
            header_bytes = 4 + 4 * len(shape)
            if not gzipped and header_bytes + nbytes != size:
                raise GoodnetError(f"{path}: header declares {nbytes} bytes of data but the file "
                                   f"holds {size - header_bytes}")
            data = _read_block_wise(stream, nbytes)
            if len(data) < nbytes:
                raise GoodnetError(f"{path}: truncated, {len(data)} of the {nbytes} bytes of "
                                   f"data declared in its header")
            if stream.read(1):
                raise GoodnetError(f"{path}: data continues past the {nbytes} bytes declared in "
                                   f"its header")
    except (OSError, EOFError, zlib.error) as err:
        raise GoodnetError(f"{path}: cannot read ({err})") from None
    array = np.frombuffer(data, dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_header(stream: io.BufferedIOBase, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] or magic[1] or magic[2] not in _DTYPES or not magic[3]:
        raise GoodnetError(f"{path}: not an IDX file (magic number 0x{magic.hex()})")
    ndim = magic[3]
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise GoodnetError(f"{path}: truncated header")
    return np.dtype(_DTYPES[magic[2]]), struct.unpack(f">{ndim}I", sizes)


def _read_block_wise(stream: io.BufferedIOBase, nbytes: int) -> bytearray:
    data = bytearray()
    while len(data) < nbytes:
        block = stream.read(min(_BLOCK, nbytes - len(data)))
        if not block:
            break
        data += block
    return data


def idx_files(folder: str | Path, split: str) -> tuple[Path, Path]:
    """The images file and the labels file of ``split`` in ``folder`` (plain or ``.gz``)."""
    prefix = _PREFIXES[check_split(split)]
    return (_find(Path(folder), f"{prefix}-images-idx3-ubyte"),
            _find(Path(folder), f"{prefix}-labels-idx1-ubyte"))


def _find(folder: Path, stem: str) -> Path:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.exists():  # read_idx refuses what is not a regular file
            return path
    raise GoodnetError(f"{folder}: has neither {stem} nor {stem}.gz")


def load_idx(folder: str | Path, split: str) -> ImageData:
    """The MNIST-style data set (10 classes) of ``split`` from the IDX files in ``folder``.

    Returns:
        Images ``(N, 1, H, W)`` ``uint8``, named ``"<folder name>:<split>"``.
    """
    images_path, labels_path = idx_files(folder, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise GoodnetError(f"{images_path}: expected unsigned bytes shaped (N, H, W), got "
                           f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise GoodnetError(f"{labels_path}: expected unsigned bytes shaped (N,), got "
                           f"{labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise GoodnetError(f"{labels_path}: {len(labels)} labels for the {len(images)} images "
                           f"in {images_path.name}")
    return image_data(images[:, None], labels_tensor(labels, 10, labels_path), 10,
                      f"{Path(folder).name}:{split}", images_path)
