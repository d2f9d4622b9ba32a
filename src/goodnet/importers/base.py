"""What every importer shares: the settings of an import and the shape of a registry entry.

:class:`ImportOptions` gathers what a foreign file does not say about itself and the user must
(the command line's ``--arch``, ``--arch-arg``, ``--input-shape``, ``--mean``, ``--std`` and
``--pixel-scale``); each importer reads the options its format needs and leaves the others. An
:class:`Importer` is one entry of :data:`goodnet.importers.IMPORTERS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goodnet.artifacts import LoadedModel
from goodnet.errors import GoodnetError


def is_own_class(arch: str | None) -> bool:
    """Whether ``arch`` names the user's own network class (``package.module:Class``) rather
    than a goodnet architecture."""
    return arch is not None and ":" in arch


@dataclass(frozen=True)
class ImportOptions:
    """How to read a model file whose format leaves things out.

    Attributes:
        arch: the architecture a weights-only file loads onto (a goodnet architecture, or your
            own class as ``package.module:Class``); None to build the model from the file.
        arch_args: keyword arguments for your own class's constructor (only with such an
            ``arch``).
        input_shape: (C, H, W) of the input, where the file does not fix it.
        mean: per-channel input mean the network was trained with, after ``pixel_scale``.
        std: per-channel input standard deviation, after ``pixel_scale``.
        pixel_scale: 255 if the network takes raw pixels 0-255, 1 if it takes [0, 1]; None for
            the format's usual one (255 for Keras files, 1 for checkpoints and ONNX).
    """

    arch: str | None = None
    arch_args: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pixel_scale: float | None = None

    def __post_init__(self) -> None:
        if self.arch_args and not is_own_class(self.arch):
            raise GoodnetError("--arch-arg gives arguments to your own network class: use it "
                               "with --arch package.module:Class")

    def scale(self, usual: float) -> float:
        """``pixel_scale``, or the format's ``usual`` one where none was given."""
        return usual if self.pixel_scale is None else self.pixel_scale


def any_options(options: ImportOptions) -> bool:
    """An importer that reads its files with whatever options are given."""
    return True


@dataclass(frozen=True)
class Importer:
    """One foreign model format.

    Attributes:
        sniff: whether a file is in this format, from its name or its first bytes (cheap; a
            named pipe or a device is never opened).
        load: the file as a goodnet model with its card, read as data.
        takes: whether this importer reads such a file with these options: formats may share a
            file type (a checkpoint loads onto a goodnet architecture, or into your own class).
    """

    sniff: Callable[[str | os.PathLike[str]], bool]
    load: Callable[[Path, ImportOptions], LoadedModel]
    takes: Callable[[ImportOptions], bool] = any_options
