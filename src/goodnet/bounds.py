"""The largest input goodnet builds, runs or reads, and the check against it.

Below every other module (it imports only :mod:`goodnet.errors`): model cards, the importers,
the data loaders, images and the command line all check sizes here, and none of them has to
import the models package for it.
"""

from __future__ import annotations

import numbers
from typing import Any

from goodnet.errors import GoodnetError

# The largest input goodnet builds, runs or reads: every real use fits (MNIST 28², CIFAR 32²,
# CSAW-HackML 55×47, ImageNet-size 224²) with room to spare, and a model on the largest one
# still runs on a CPU in a few hundred megabytes. Model cards, imports, data sets, images and
# the CLI all check against these through :func:`check_input_size`.
MAX_SIDE = 1024
MAX_PIXELS = 256 * 256
MAX_CHANNELS = 64
MAX_CLASSES = 100_000
# Bounds on the input normalisation (pixel scale, per-channel mean and std), so that
# (x · pixel_scale − mean) / std stays finite in float32 for every pixel in [0, 1].
MAX_NORMALIZATION = 1e6
MIN_STD = 1e-6


def check_input_size(channels: int, height: int, width: int, source: str = "input") -> None:
    """Refuse an input shape goodnet will not build or run a model for.

    Args:
        channels: image channels.
        height: image height in pixels.
        width: image width in pixels.
        source: what declared the shape (a file, a setting), named in the error.

    Raises:
        GoodnetError: a size that is not a positive integer, a side over :data:`MAX_SIDE`,
            more than :data:`MAX_PIXELS` pixels or more than :data:`MAX_CHANNELS` channels.
    """
    sizes = (channels, height, width)
    if not all(is_int(n) and n >= 1 for n in sizes):
        raise GoodnetError(f"{source}: input shape {sizes} (C, H, W) must be positive integers")
    if (channels > MAX_CHANNELS or max(height, width) > MAX_SIDE
            or height * width > MAX_PIXELS):
        raise GoodnetError(
            f"{source}: input of {channels}×{height}×{width} (C×H×W) is larger than goodnet "
            f"runs (at most {MAX_CHANNELS} channels, {MAX_SIDE} pixels a side and "
            f"{MAX_PIXELS:,} pixels)"
        )


def is_int(value: Any) -> bool:
    """An integer, not a bool (JSON's true is no size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
