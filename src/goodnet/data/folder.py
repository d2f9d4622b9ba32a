"""An image folder: one subfolder per class, PNG or JPEG files inside.

The layout torchvision's ``ImageFolder`` reads: ``root/<class name>/<image>.png``. The classes
are the subfolders in sorted order (the first is class 0, and an empty subfolder still counts as
a class); the images of a class are taken in sorted file-name order. Files with other endings
and hidden entries (names starting with a dot) are skipped.

Pillow decodes only PNG and JPEG here, whatever a file is named, and an image that declares
more pixels than Pillow's decompression-bomb limit is refused from its header (see
:func:`~goodnet.data.images.open_image`). Every image must have the size of the first one;
mode ``L`` gives one channel, ``RGB`` three, and every other mode is converted to RGB; one- and
three-channel images may not be mixed. Each image's size is checked from its header, before it
is decoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from goodnet.data._common import image_data
from goodnet.data.dataset import ImageData
from goodnet.data.images import DECODE_ERRORS, cannot_read, open_image
from goodnet.errors import GoodnetError

_ENDINGS = {".png", ".jpg", ".jpeg"}
_FORMATS = ("PNG", "JPEG")


def load_folder(folder: str | Path, num_classes: int | None = None) -> ImageData:
    """The images ``(N, C, H, W)`` ``uint8`` of a folder of class subfolders, named after it.

    Args:
        folder: the folder of class subfolders.
        num_classes: classes of the task; by default the number of subfolders.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GoodnetError(f"{folder}: no such folder")
    try:
        files, labels, subfolders = _list_images(folder)
    except OSError as err:
        raise GoodnetError(f"{folder}: cannot list its images ({err})") from None
    first = _read(files[0], None)
    images = np.empty((len(files), *first.shape), np.uint8)
    images[0] = first
    for index, path in enumerate(files[1:], start=1):
        image = _read(path, first.shape[1:])
        if image.shape[0] != first.shape[0]:
            raise GoodnetError(f"{path}: {image.shape[0]} channel(s), but {files[0]} has "
                               f"{first.shape[0]}")
        images[index] = image
    return image_data(images, torch.tensor(labels, dtype=torch.int64),
                      subfolders if num_classes is None else num_classes, folder.name, folder)


def _list_images(folder: Path) -> tuple[list[Path], list[int], int]:
    """The image files under ``folder``'s class subfolders, their labels, and the class count."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise GoodnetError(f"{folder}: no class subfolders")
    files, labels = [], []
    for label, subfolder in enumerate(classes):
        for path in sorted(subfolder.iterdir()):
            if path.suffix.lower() in _ENDINGS and path.is_file() and not path.name.startswith("."):
                files.append(path)
                labels.append(label)
    if not files:
        raise GoodnetError(f"{folder}: no PNG or JPEG images in its class subfolders")
    return files, labels, len(classes)


def _read(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image ``(C, H, W)``, refused unless its ``(H, W)`` is ``size`` (when given)."""
    with open_image(path, _FORMATS) as image:
        if size is not None and (image.height, image.width) != size:
            raise GoodnetError(f"{path}: {image.width}x{image.height} pixels, but the "
                               f"images before it are {size[1]}x{size[0]}")
        try:
            array = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
        except DECODE_ERRORS as err:
            raise GoodnetError(f"{path}: {cannot_read(_FORMATS)} ({err})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
