"""Images and labels in a NumPy ``.npz`` archive.

An ``.npz`` file is a ZIP archive with one ``.npy`` member per array (NumPy's
``numpy.lib.format``: a magic string, a header with the shape, type and order, then the raw
values). A data set is the arrays ``x`` (images) and ``y`` (integer labels). ``x`` may be
``(N, H, W)`` (one channel), ``(N, H, W, C)`` with C in {1, 3} (channels last) or
``(N, C, H, W)`` (channels first; chosen whenever both readings are possible, which is what
:func:`save_npz` writes), with ``uint8`` pixels 0..255 (or any whole numbers 0..255) or floats
in [0, 1].

Object arrays, which NumPy stores as pickles, are refused (``allow_pickle=False``). Each
member's size is checked before NumPy allocates it: the shape in its header must account for
the member's size in the ZIP directory, and that size may not exceed what the archive could
hold (deflate expands at most 1032 to 1). Within that, a data set's shapes are checked from the
headers before anything is decompressed: the layout of ``x``, its images against goodnet's
input bounds (:func:`goodnet.bounds.check_input_size`), one label per image in ``y``. A
2 MB file of zeros can declare a 46000×46000 image; it is refused without inflating 2 GB.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from goodnet.bounds import check_input_size
from goodnet.data._common import check_pixel_type, file_size, image_data, labels_tensor, pixels
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError

_MAX_DEFLATE_RATIO = 1032
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, RuntimeError, NotImplementedError,
                zipfile.BadZipFile, zlib.error)

Header = tuple[tuple[int, ...], np.dtype]
"""An array's shape and type, as its ``.npy`` header declares them."""


def read_npz(path: str | Path, names: Iterable[str],
             check: Callable[[Mapping[str, Header]], None] | None = None
             ) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` file, refusing pickles and impossible sizes.

    Args:
        path: the ``.npz`` file.
        names: the arrays to read.
        check: called with every array's declared shape and type before any array is
            decompressed; raises to refuse the file.
    """
    path = Path(path)
    size = file_size(path)
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {name: _check_member(archive, name, path, size) for name in names}
        if check is not None:
            check(headers)
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in names}
    except _READ_ERRORS as err:
        raise GoodnetError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from None


def _check_member(archive: zipfile.ZipFile, name: str, path: Path, size: int) -> Header:
    try:
        info = archive.getinfo(f"{name}.npy")
    except KeyError:
        present = ", ".join(n.removesuffix(".npy") for n in archive.namelist()) or "none"
        raise GoodnetError(f"{path}: no array '{name}' (the file has: {present})") from None
    if info.compress_type == zipfile.ZIP_STORED:
        limit = min(info.compress_size, size)
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        limit = _MAX_DEFLATE_RATIO * min(info.compress_size, size)
    else:
        raise GoodnetError(f"{path}: array '{name}' uses an unsupported ZIP compression")
    if info.file_size > limit:
        raise GoodnetError(f"{path}: array '{name}' declares {info.file_size} bytes, more than "
                           f"the file can hold")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
        header_size = member.tell()
    if dtype.hasobject:
        raise GoodnetError(f"{path}: array '{name}' holds Python objects (a pickle); refused")
    if header_size + math.prod(shape) * dtype.itemsize != info.file_size:
        raise GoodnetError(f"{path}: array '{name}' declares shape {shape} of {dtype}, which "
                           f"does not match its {info.file_size} bytes")
    return shape, dtype


def load_npz(path: str | Path, num_classes: int | None = None) -> ImageData:
    """The images ``x`` and labels ``y`` of an ``.npz`` file, named after the file.

    Args:
        path: the ``.npz`` file.
        num_classes: classes of the task; by default the largest label plus one.
    """
    path = Path(path)
    arrays = read_npz(path, ("x", "y"), check=lambda headers: _check_shapes(headers, path))
    x, y = arrays["x"], arrays["y"]
    if num_classes is None:
        if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer) or not len(y):
            raise GoodnetError(f"{path}: y must be integer labels, got {y.dtype} {y.shape}")
        num_classes = max(int(y.max()) + 1, 1)
    labels = labels_tensor(y, num_classes, path)
    return image_data(_channels_first(pixels(x, path), path), labels, num_classes, path.name,
                      path)


def _check_shapes(headers: Mapping[str, Header], path: Path) -> None:
    """Refuse, from the headers alone, a data set goodnet would refuse once read: pixels that
    are not numbers, a layout of ``x`` it does not read, images beyond goodnet's input bounds,
    a ``y`` that is not one label per image."""
    (x_shape, x_type), (y_shape, _) = headers["x"], headers["y"]
    check_pixel_type(x_type, path)
    layout = _layout(x_shape, path)
    channels, height, width = (1, *x_shape[1:]) if layout == "NHW" else \
        x_shape[1:] if layout == "NCHW" else (x_shape[3], *x_shape[1:3])
    check_input_size(channels, height, width, source=str(path))
    if len(y_shape) != 1 or y_shape[0] != x_shape[0]:
        raise GoodnetError(f"{path}: y must hold one label per image of x, got shape {y_shape} "
                           f"for x of shape {x_shape}")


def _layout(shape: tuple[int, ...], path: Path) -> str:
    """How ``x`` of ``shape`` holds its images: NHW, NCHW (chosen when both readings are
    possible) or NHWC."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW"
    if len(shape) == 4 and shape[3] in (1, 3):
        return "NHWC"
    raise GoodnetError(f"{path}: x must be (N, H, W), (N, H, W, C) or (N, C, H, W) with 1 or 3 "
                       f"channels, got shape {shape}")


def _channels_first(x: np.ndarray, path: Path) -> np.ndarray:
    layout = _layout(x.shape, path)
    return x[:, None] if layout == "NHW" else x if layout == "NCHW" else x.transpose(0, 3, 1, 2)


def save_npz(path: str | Path, data: ImageData) -> None:
    """Write ``data`` as ``x`` ``(N, C, H, W)`` and ``y``, readable by :func:`load_npz`."""
    try:
        write_npz(path, {"x": data.images.detach().cpu().numpy(),
                         "y": data.labels.detach().cpu().numpy()})
    except OSError as err:
        raise GoodnetError(f"{path}: cannot write ({err})") from None


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` uncompressed to ``path`` atomically.

    The archive goes to a temporary file in the same folder, is flushed to disk and then
    renamed over ``path``, so a reader sees either the old file or the whole new one.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, allow_pickle=False, **arrays)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
