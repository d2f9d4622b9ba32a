"""Data sets: one loader per source format, and a registry of the standard data sets.

Every loader returns an :class:`ImageData` with channels-first images (``uint8`` where the
source has 8-bit pixels) and raises :class:`~goodnet.errors.GoodnetError`, naming the file and
the problem, for any input it cannot read. :func:`load_dataset` takes a registry name or a path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from goodnet.data.cache import cached
from goodnet.data.cifar import load_cifar10
from goodnet.data.csaw import load_csaw
from goodnet.data.dataset import ImageData, batches, split_clean
from goodnet.data.folder import load_folder
from goodnet.data.idx import load_idx, read_idx
from goodnet.data.mnist_csv import load_mnist_csv, read_mnist_csv
from goodnet.data.npz import load_npz, save_npz
from goodnet.data.sources import cifar10, fashion_mnist, load_path, mnist
from goodnet.errors import GoodnetError

__all__ = [
    "DATASETS",
    "ImageData",
    "batches",
    "cached",
    "load_cifar10",
    "load_csaw",
    "load_dataset",
    "load_folder",
    "load_idx",
    "load_mnist_csv",
    "load_npz",
    "read_idx",
    "read_mnist_csv",
    "save_npz",
    "split_clean",
]

DATASETS: dict[str, Callable[[str, Path | None], ImageData]] = {
    "mnist": mnist,
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
}


def load_dataset(
    name_or_path: str | Path,
    split: str = "train",
    root: str | Path | None = None,
    *,
    num_classes: int | None = None,
) -> ImageData:
    """A registered data set by name, or the data set at a path.

    Args:
        name_or_path: a key of :data:`DATASETS`, or a file or folder (see
            :func:`goodnet.data.sources.load_path` for which loader reads what).
        split: ``"train"`` or ``"test"``.
        root: where a registered data set lies, instead of its offline copy; a path needs
            none, and ``root`` is not used with one.
        num_classes: the class count of the model the data is for. Data at a path takes it
            instead of inferring one from its labels, and only labels outside
            ``[0, num_classes)`` are refused; a registered data set keeps its own count.
    """
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        return DATASETS[name_or_path](split, None if root is None else Path(root))
    if not Path(name_or_path).exists():
        raise GoodnetError(f"{name_or_path}: neither a data set name ({', '.join(DATASETS)}) "
                           f"nor an existing file or folder")
    return load_path(name_or_path, split, num_classes)
