"""CSAW-HackML HDF5 files: layout kept, pixel types, and refusal of broken files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from goodnet.data import load_csaw
from goodnet.errors import GoodnetError


def _write(path, data, label, **datasets):
    with h5py.File(path, "w") as file:
        file.create_dataset("data", data=data)
        file.create_dataset("label", data=label)
        for name, value in datasets.items():
            file.create_dataset(name, data=value)
    return path


def _faces(n: int = 3) -> np.ndarray:
    """Whole-valued float64 pixels 0..255 shaped (N, 3, 55, 47), as the lab's files."""
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 3, 55, 47)).astype(np.float64)


def test_load_csaw_keeps_the_channels_first_layout(tmp_path):
    faces = _faces()
    faces[1, 2, 54, 46] = 255.0  # blue, last row, last column
    faces[2, 0, 0, 1] = 7.0  # red, first row, second column
    data = load_csaw(_write(tmp_path / "clean_validation_data.h5", faces,
                            np.array([0.0, 1282.0, 5.0])))
    assert data.images.shape == (3, 3, 55, 47)
    assert data.images.dtype == torch.uint8
    assert data.images[1, 2, 54, 46] == 255 and data.images[2, 0, 0, 1] == 7
    assert torch.equal(data.images, torch.from_numpy(faces.astype(np.uint8)))
    assert data.labels.tolist() == [0, 1282, 5]
    assert data.num_classes == 1283
    assert data.name == "clean_validation_data.h5"


def test_load_csaw_keeps_floats_in_0_1_as_float32(tmp_path):
    faces = _faces() / 255.0
    data = load_csaw(_write(tmp_path / "scaled.h5", faces, np.array([1, 2, 3])))
    assert data.images.dtype == torch.float32
    assert torch.allclose(data.images, torch.from_numpy(faces).float())


def test_load_csaw_reads_integer_pixels_and_takes_num_classes(tmp_path):
    faces = _faces(2).astype(np.uint8)
    data = load_csaw(_write(tmp_path / "bytes.h5", faces, np.array([3, 4])), num_classes=5)
    assert torch.equal(data.images, torch.from_numpy(faces)) and data.num_classes == 5


@pytest.mark.parametrize(
    ("faces", "label", "message"),
    [
        (_faces() + 0.5, [0, 1, 2], "integers 0..255 or floats in \\[0, 1\\].*with fractions"),
        (_faces() * 2, [0, 1, 2], "found 0..510"),
        (-_faces(), [0, 1, 2], "must be integers 0..255"),
        (np.full((3, 3, 55, 47), np.nan), [0, 1, 2], "NaN or infinity"),
        (_faces().transpose(0, 2, 3, 1), [0, 1, 2], r"got float64 \(3, 55, 47, 3\)"),
        (_faces(), [0, 1], r"'label' must be 3 numbers"),
        (_faces(), [0, 1, 1283], r"labels must lie in \[0, 1282\]"),
        (_faces(), [0, 1, 2.5], "labels must be whole numbers"),
        (_faces(0), np.zeros(0), "contains no images"),
    ],
    ids=["fractions", "above 255", "negative", "nan", "channels last", "label count",
         "label 1283", "fractional label", "empty"],
)
def test_load_csaw_refuses_bad_content(tmp_path, faces, label, message):
    path = _write(tmp_path / "bad.h5", faces, np.array(label))
    with pytest.raises(GoodnetError, match=message) as error:
        load_csaw(path)
    assert str(path) in str(error.value)


def test_load_csaw_names_a_missing_dataset(tmp_path):
    path = tmp_path / "no_label.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("data", data=_faces())
        file.create_dataset("labels", data=np.zeros(3))
    with pytest.raises(GoodnetError, match="no dataset 'label' \\(the file has: data, labels\\)"):
        load_csaw(path)


def test_load_csaw_refuses_a_declared_size_the_file_cannot_hold(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("data", shape=(10**8, 3, 55, 47), dtype="f8")  # never written
        file.create_dataset("label", shape=(10**8,), dtype="i8")
    assert path.stat().st_size < 10**6
    with pytest.raises(GoodnetError, match=r"'/data' declares float64 \(100000000, 3, 55, 47\)"
                       r" .* stores 0 bytes"):
        load_csaw(path)


def test_load_csaw_refuses_data_kept_in_another_file(tmp_path):
    """HDF5 external storage: 'data' read from /dev/zero, as in the field report (any other
    file, a secret one included, would be read the same way)."""
    path = tmp_path / "zero.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("data", shape=(2, 1, 8, 8), dtype="u1",
                            external=[("/dev/zero", 0, h5py.h5f.UNLIMITED)])
        file.create_dataset("label", data=np.array([0, 1]))
    with pytest.raises(GoodnetError, match="/data keeps its data in another file"):
        load_csaw(path, num_classes=2)


@pytest.mark.parametrize("content", [b"", b"\x89HDF\r\n\x1a\n" + bytes(100), b"not hdf5" * 50])
def test_load_csaw_refuses_files_that_are_not_hdf5(tmp_path, content):
    path = tmp_path / "broken.h5"
    path.write_bytes(content)
    with pytest.raises(GoodnetError, match="cannot read as HDF5"):
        load_csaw(path)


def test_load_csaw_refuses_a_truncated_file(tmp_path):
    path = _write(tmp_path / "cut.h5", _faces(), np.array([0, 1, 2]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GoodnetError, match="cannot read as HDF5"):
        load_csaw(path)
