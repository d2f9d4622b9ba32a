"""The HDF5 data files of the CSAW-HackML 2020 backdoor lab (NYU).

Each file (clean or poisoned validation and test sets of faces of 1283 people from the YouTube
Aligned Face data set) holds two datasets: ``data``, shaped (N, 3, 55, 47) -- channels first,
pixel values 0..255 stored as whole-valued floats -- and ``label``, shaped (N,), class ids
0..1282. The lab's own loader transposes ``data`` to channels last for Keras; here the stored
channels-first layout is kept as it is.

Pixels that are whole numbers 0..255 become ``uint8``; a float file whose values all lie in
[0, 1] is taken as already scaled and kept as ``float32``. Any (N, C, H, W) with one or three
channels is accepted, so other data sets saved in the same layout load too. The file is opened
through :mod:`goodnet.hdf5`: one that links or maps to other files is refused before anything is
read, and a dataset that declares more than the file stores for it is refused before it is
allocated.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from goodnet.data._common import image_data, labels_tensor, pixels
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.hdf5 import child, open_hdf5, read


def load_csaw(path: str | Path, num_classes: int = 1283) -> ImageData:
    """The images and labels of a CSAW-HackML HDF5 file, named after the file.

    Args:
        path: the ``.h5`` file.
        num_classes: classes of the task (1283 people in the lab's data).
    """
    path = Path(path)
    with open_hdf5(path) as file:
        data, label = _dataset(file, "data", path), _dataset(file, "label", path)
        if data.ndim != 4 or data.shape[1] not in (1, 3) or data.dtype.kind not in "uif":
            raise GoodnetError(f"{path}: 'data' must be numbers shaped (N, C, H, W) with 1 "
                               f"or 3 channels, got {data.dtype} {data.shape}")
        if label.shape != (data.shape[0],) or label.dtype.kind not in "uif":
            raise GoodnetError(f"{path}: 'label' must be {data.shape[0]} numbers, got "
                               f"{label.dtype} {label.shape}")
        images, labels = read(data, path), read(label, path)
    if labels.dtype.kind == "f":
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise GoodnetError(f"{path}: labels must be whole numbers")
        labels = labels.astype(np.int64)
    return image_data(pixels(images, path), labels_tensor(labels, num_classes, path),
                      num_classes, path.name, path)


def _dataset(file: h5py.File, name: str, path: Path) -> h5py.Dataset:
    dataset = child(file, name, path)
    if not isinstance(dataset, h5py.Dataset):
        raise GoodnetError(f"{path}: no dataset '{name}' (the file has: "
                           f"{', '.join(sorted(file.keys())) or 'nothing'})")
    return dataset
