"""Triggers: pure callables that turn a batch of clean images into poisoned ones.

A trigger takes ``(N, C, H, W)`` floats in [0, 1] and returns a new tensor of the same shape and
range; it never modifies its input and, for a fixed trigger, is deterministic. The same object
poisons training data and evaluates attack success, so the two cannot drift apart.
"""

from __future__ import annotations

import torch

from goodnet.errors import GoodnetError
from goodnet.paths import require_regular_file

# The largest trigger image read (it is resized to the data's size): 64 MiB decoded as RGBA.
MAX_PATTERN_PIXELS = 4096 * 4096


class PatchTrigger:
    """Paste ``pattern`` through ``mask`` at a fixed position: ``x·(1−m) + p·m`` inside the patch.

    Args:
        pattern: ``(C, h, w)`` or ``(1, h, w)`` (broadcast over channels) values in [0, 1].
        mask: ``(h, w)`` opacity in [0, 1] (1: the pattern replaces the pixel).
        top: row of the patch's top edge; negative counts from the bottom (``-h`` puts the
            patch flush with the bottom edge).
        left: column of the patch's left edge; negative counts from the right.
    """

    def __init__(self, pattern: torch.Tensor, mask: torch.Tensor, top: int, left: int) -> None:
        if pattern.ndim != 3 or mask.ndim != 2 or tuple(pattern.shape[1:]) != tuple(mask.shape):
            raise GoodnetError(
                f"patch pattern (C, h, w) and mask (h, w) disagree: {tuple(pattern.shape)} "
                f"and {tuple(mask.shape)}"
            )
        if pattern.min() < 0 or pattern.max() > 1 or mask.min() < 0 or mask.max() > 1:
            raise GoodnetError("patch pattern and mask values must lie in [0, 1]")
        self.pattern = pattern.float()
        self.mask = mask.float()
        self.top = top
        self.left = left

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns the patch covers in an image of that size."""
        h, w = self.mask.shape
        top = self.top + height if self.top < 0 else self.top
        left = self.left + width if self.left < 0 else self.left
        if not (top >= 0 and top + h <= height and left >= 0 and left + w <= width):
            raise GoodnetError(
                f"a {h}×{w} patch at ({self.top}, {self.left}) does not fit a "
                f"{height}×{width} image"
            )
        return slice(top, top + h), slice(left, left + w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.region(x.shape[-2], x.shape[-1])
        if self.pattern.shape[0] not in (1, x.shape[1]):
            raise GoodnetError(
                f"a {self.pattern.shape[0]}-channel pattern cannot mark {x.shape[1]}-channel images"
            )
        out = x.clone()
        pattern = self.pattern.to(x.device, x.dtype)
        mask = self.mask.to(x.device, x.dtype)
        patch = out[..., rows, cols]
        out[..., rows, cols] = patch * (1 - mask) + pattern * mask
        return out


def check_patch(who: str, size: int, margin: int, image_shape: tuple[int, int, int]) -> None:
    """Refuse a square patch of side ``size``, ``margin`` pixels in from the image's edges, that
    does not fit a ``(C, H, W)`` image; called before the patch is built, so a setting read from
    a file (a patch of 20000 pixels) costs nothing."""
    _, height, width = image_shape
    if size < 1 or margin < 0 or size + margin > min(height, width):
        raise GoodnetError(f"{who}: a {size}-pixel patch {margin} pixels in from the edge does "
                           f"not fit a {height}×{width} image")


def square_pattern(kind: str, size: int, channels: int = 1) -> torch.Tensor:
    """A ``(channels, size, size)`` pattern: "white" (all ones) or "checkerboard" (1 at even
    ``row + col``, 0 elsewhere; the top-left pixel is white)."""
    if size < 1:
        raise GoodnetError(f"patch size must be >= 1, got {size}")
    if kind == "white":
        square = torch.ones(size, size)
    elif kind == "checkerboard":
        index = torch.arange(size)
        square = ((index.view(-1, 1) + index.view(1, -1)) % 2 == 0).float()
    else:
        raise GoodnetError(f"unknown patch pattern {kind!r}; choose 'white' or 'checkerboard'")
    return square.expand(channels, size, size).clone()


class BlendTrigger:
    """Blend a full-image pattern into the input: ``(1 − α)·x + α·pattern``.

    Args:
        pattern: ``(C, H, W)`` or ``(1, H, W)`` values in [0, 1].
        alpha: blend ratio in [0, 1].
        mask: optional ``(H, W)`` weights in [0, 1] scaling ``alpha`` per pixel.
    """

    def __init__(self, pattern: torch.Tensor, alpha: float, mask: torch.Tensor | None = None):
        if not 0 <= alpha <= 1:
            raise GoodnetError(f"blend ratio must be in [0, 1], got {alpha}")
        self.pattern = pattern.float()
        self.alpha = alpha
        self.mask = None if mask is None else mask.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(self.pattern.shape[-2:]) != tuple(x.shape[-2:]):
            raise GoodnetError(
                f"a {tuple(self.pattern.shape[-2:])} blend pattern cannot mark "
                f"{tuple(x.shape[-2:])} images"
            )
        weight = torch.tensor(self.alpha, dtype=x.dtype, device=x.device)
        if self.mask is not None:
            weight = weight * self.mask.to(x.device, x.dtype)
        return x * (1 - weight) + self.pattern.to(x.device, x.dtype) * weight


class AdditiveTrigger:
    """Add a fixed perturbation and clip to [0, 1]: ``clip(x + δ)`` (SIG, low-frequency)."""

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta.to(x.device, x.dtype)).clamp(0, 1)


def blend_key(pattern: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """A blend pattern: ``"noise"`` (uniform noise from ``seed``) or the path of an image."""
    if pattern == "noise":
        return noise_pattern(shape, seed)
    return image_pattern(pattern, shape)


def noise_pattern(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Uniform noise in [0, 1] of ``shape``, fixed by ``seed``."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def image_pattern(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as a ``shape`` (C, H, W) pattern in [0, 1], resized to fit."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    require_regular_file(path)
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PATTERN_PIXELS:  # checked before decoding
                raise GoodnetError(f"{path}: a trigger image of {image.width}×{image.height} "
                                   f"pixels; at most {MAX_PATTERN_PIXELS:,} are read")
            image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise GoodnetError(f"{path}: cannot read the trigger image ({error})") from None
    return data.view(height, width, -1).permute(2, 0, 1).float().div(255)
