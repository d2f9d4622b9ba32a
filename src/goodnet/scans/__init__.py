"""Backdoor scanners, one module each, through the ``SCANNERS`` registry.

A scanner answers "is this model backdoored, and towards which class?" before any repair:
``goodnet.scan(model, clean)`` (or ``make_scanner(name, settings).scan(model, clean)``) returns a
:class:`ScanReport`; the command line is ``goodnet scan``. Adding a scanner is one module (a
:class:`Scanner` subclass with its settings dataclass and a ``run`` method) and one line here.

Beside the registry, as in every registry package, ``DEFAULT_SCANNERS`` names what runs when the
user names no scanner (``goodnet scan`` without ``--scanner``). The choice depends on the data
the user gives, so it is a dict from the case (``"with-clean"``: clean data given,
``"data-free"``: none) to a registered scanner, at its default settings;
:func:`default_scanner` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.methods import make_method
from goodnet.scans.base import Scanned, Scanner, ScanReport
from goodnet.scans.mm_bd import MMBD, MMBDConfig
from goodnet.scans.nc import NCScanner

SCANNERS: dict[str, type[Scanner[Any]]] = {
    "mm-bd": MMBD,
    "nc": NCScanner,
}


def scanner_class(name: str) -> type[Scanner[Any]]:
    """The registered scanner called ``name``, or a clear error listing them."""
    if name not in SCANNERS:
        raise GoodnetError(f"unknown scanner {name!r}; choose from {', '.join(SCANNERS)}")
    return SCANNERS[name]


def make_scanner(name: str, settings: Mapping[str, Any] | None = None, *,
                 text: bool = False) -> Scanner[Any]:
    """Build a registered scanner from its name and settings (plain values; ``text=True``:
    command-line text). Unknown settings are refused."""
    return cast(Scanner[Any], make_method(SCANNERS, "scanner", name, settings, text=text))


# Neural Cleanse when clean data is given, MM-BD (data-free) otherwise.
DEFAULT_SCANNERS: dict[str, str] = {"with-clean": "nc", "data-free": "mm-bd"}


def default_scanner(clean: ImageData | None) -> str:
    """The scanner ``goodnet scan`` runs without ``--scanner`` (:data:`DEFAULT_SCANNERS`), given
    clean data or none."""
    return DEFAULT_SCANNERS["with-clean" if clean is not None else "data-free"]


def scan(model: nn.Module, clean: ImageData | None = None, *, scanner: str | None = None,
         settings: Mapping[str, Any] | None = None, progress: bool = False) -> ScanReport:
    """Scan ``model`` for a backdoor (the model is not modified).

    Args:
        model: the network (image-space inputs in [0, 1], as every goodnet model takes).
        clean: a little clean data, for the scanners that need it.
        scanner: a registered scanner; default :func:`default_scanner`.
        settings: the scanner's settings (plain values).
        progress: show progress bars.
    """
    return make_scanner(scanner or default_scanner(clean), settings).scan(
        model, clean, progress=progress)


__all__ = [
    "DEFAULT_SCANNERS",
    "MMBD",
    "SCANNERS",
    "MMBDConfig",
    "NCScanner",
    "ScanReport",
    "Scanned",
    "Scanner",
    "default_scanner",
    "make_scanner",
    "scan",
    "scanner_class",
]
