"""Image files: opened safely (for image folders and ``goodnet predict``) and read as inputs.

:func:`open_image` opens only regular files (a named pipe would block the reader forever), only
in formats Pillow decodes itself (EPS, for one, would hand the file to Ghostscript), and refuses
a header that declares more pixels than Pillow's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``) instead of letting Pillow print its warning and decode it.
Pillow reads only the header when it opens a file, so each caller can check the size before a
pixel is decoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from goodnet.errors import GoodnetError
from goodnet.paths import require_regular_file

FORMATS = ("PNG", "JPEG", "PPM", "BMP", "GIF", "TIFF", "WEBP")
# What Pillow raises for a damaged or unsupported file, while opening or decoding it.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError)


@contextmanager
def open_image(path: str | Path, formats: tuple[str, ...] = FORMATS) -> Iterator[Image.Image]:
    """``path`` opened by Pillow, its header read and nothing decoded yet; closed on exit."""
    path = require_regular_file(path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it, then decodes: refuse instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path, formats=formats)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise GoodnetError(f"{path}: the image has more pixels than goodnet decodes "
                           f"({error})") from None
    except DECODE_ERRORS as error:
        raise GoodnetError(f"{path}: {cannot_read(formats)} ({error})") from None
    with image:
        yield image


def cannot_read(formats: tuple[str, ...]) -> str:
    """The start of the message for an image that is none of ``formats`` or is damaged."""
    names = f"{', '.join(formats[:-1])} or {formats[-1]}" if len(formats) > 1 else formats[0]
    return f"cannot read as {names}"


def read_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """``path`` as a ``(C, H, W)`` float tensor in [0, 1], converted to ``shape``'s channels;
    its size must already be ``H × W`` (nothing is resized behind the user's back), and is
    checked before the image is decoded."""
    channels, height, width = shape
    with open_image(path) as image:
        if image.size != (width, height):
            raise GoodnetError(f"{path}: the image is {image.size[0]}×{image.size[1]} (W×H) "
                               f"but the model takes {width}×{height}")
        try:
            image.load()
            image = image.convert("L" if channels == 1 else "RGB")
        except DECODE_ERRORS as error:
            raise GoodnetError(f"{path}: {cannot_read(FORMATS)} ({error})") from None
    pixels = np.asarray(image, dtype=np.uint8).reshape(height, width, -1)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)
