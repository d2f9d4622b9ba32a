"""Checks shared by the loaders: splits, file sizes, labels and pixel values.

Every check raises :class:`~goodnet.errors.GoodnetError` with a one-line message that names the
file and the problem, so that no loader lets a raw NumPy or OS error reach the user.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.paths import require_regular_file

SPLITS = ("train", "test")

# Pixel checks walk the images in blocks so that their temporaries stay small.
_BLOCK = 1024


def check_split(split: str) -> str:
    """``split`` itself, if it is ``"train"`` or ``"test"``."""
    if split not in SPLITS:
        raise GoodnetError(f"split must be 'train' or 'test', got {split!r}")
    return split


def file_size(path: Path) -> int:
    """Size in bytes of the regular file ``path``; a pipe or a device is refused unopened."""
    return os.path.getsize(require_regular_file(path))


def labels_tensor(values: np.ndarray, num_classes: int, source: Path | str) -> torch.Tensor:
    """Labels as an int64 tensor, refused unless they are integers in ``[0, num_classes)``."""
    if values.ndim != 1:
        raise GoodnetError(f"{source}: labels must be one-dimensional, got shape {values.shape}")
    if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer):
        raise GoodnetError(f"{source}: labels must be integers, got {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise GoodnetError(
            f"{source}: labels must lie in [0, {num_classes - 1}], found "
            f"{int(values.min())}..{int(values.max())}"
        )
    return torch.from_numpy(values.astype(np.int64))


def check_pixel_type(dtype: np.dtype, source: Path | str) -> None:
    """Refuse pixels that are not integers or floats (bools, strings, records)."""
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer)
                                 or np.issubdtype(dtype, np.floating)):
        raise GoodnetError(f"{source}: pixels must be numbers, got {dtype}")


def pixels(values: np.ndarray, source: Path | str) -> np.ndarray:
    """Pixels as stored: ``uint8`` when they are integers 0..255, else floats in [0, 1].

    Integer arrays and floating-point arrays that hold only whole numbers 0..255 become
    ``uint8``. A floating-point array whose values all lie in [0, 1] is read as already scaled
    and kept as ``float32``; this takes precedence, so a float array of only zeros and ones
    means black and white, not 0/255 and 1/255.
    """
    if values.dtype == np.uint8:
        return values
    check_pixel_type(values.dtype, source)
    if np.issubdtype(values.dtype, np.integer):
        if values.size and (values.min() < 0 or values.max() > 255):
            raise GoodnetError(f"{source}: pixel values must lie in 0..255, found "
                               f"{values.min()}..{values.max()}")
        return values.astype(np.uint8)
    low, high, whole = 0.0, 0.0, True
    for start in range(0, len(values), _BLOCK):
        block = values[start:start + _BLOCK]
        if not np.isfinite(block).all():
            raise GoodnetError(f"{source}: pixel values include NaN or infinity")
        low, high = min(low, float(block.min())), max(high, float(block.max()))
        whole = whole and bool((block == np.round(block)).all())
    if low >= 0.0 and high <= 1.0:
        return values.astype(np.float32)
    if low < 0.0 or high > 255.0 or not whole:
        raise GoodnetError(f"{source}: pixel values must be integers 0..255 or floats in [0, 1], "
                           f"found {low:g}..{high:g}{'' if whole else ' with fractions'}")
    return values.astype(np.uint8)


def image_data(
    images: np.ndarray, labels: torch.Tensor, num_classes: int, name: str, source: Path | str
) -> ImageData:
    """An :class:`ImageData` over ``images`` (channels first), refused if it holds no image."""
    if len(images) == 0:
        raise GoodnetError(f"{source}: contains no images")
    if not images.flags.writeable:
        images = images.copy()
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), labels, num_classes, name)
