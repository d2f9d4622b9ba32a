"""CIFAR-10, Python and binary versions, and the restricted unpickler."""

from __future__ import annotations

import builtins
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from goodnet.data import cifar as cifar_module
from goodnet.data import load_cifar10
from goodnet.data.cifar import read_cifar_pickle
from goodnet.errors import GoodnetError


def _expected(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32))


@pytest.mark.parametrize("version", ["cifar_py", "cifar_bin"])
def test_load_cifar10_puts_the_red_plane_first(request, cifar, version):
    folder = request.getfixturevalue(version)
    train = load_cifar10(folder, "train")
    assert train.images.shape == (11, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert train.images[0, 0, 1, 2] == 201  # red, row 1, column 2
    assert train.images[0, 1, 0, 0] == 77  # green, row 0, column 0
    assert train.images[0, 2, 31, 31] == 13  # blue, last pixel
    assert torch.equal(train.images, _expected(cifar.train_data))
    assert train.labels.tolist() == cifar.train_labels  # batches 1..5, in order
    assert train.num_classes == 10 and train.name == "cifar10:train"
    test = load_cifar10(folder, "test")
    assert torch.equal(test.images, _expected(cifar.test_data))
    assert test.labels.tolist() == cifar.test_labels


def test_load_cifar10_finds_the_version_folder_inside_the_given_one(cifar_py, cifar):
    assert torch.equal(load_cifar10(cifar_py.parent, "test").images, _expected(cifar.test_data))


def test_load_cifar10_accepts_a_numpy2_resave_with_protocol_4(cifar_py, cifar):
    batch = {b"data": cifar.test_data, b"labels": cifar.test_labels, b"batch_label": b"t"}
    content = pickle.dumps(batch, protocol=4)
    assert b"numpy._core.multiarray" in content
    (cifar_py / "test_batch").write_bytes(content)
    assert torch.equal(load_cifar10(cifar_py, "test").images, _expected(cifar.test_data))


def test_load_cifar10_refuses_an_incomplete_set_of_batches(cifar_py):
    (cifar_py / "data_batch_4").unlink()
    with pytest.raises(GoodnetError, match="incomplete CIFAR-10, missing data_batch_4"):
        load_cifar10(cifar_py, "train")


def test_load_cifar10_refuses_a_folder_without_batches(tmp_path):
    with pytest.raises(GoodnetError, match="no CIFAR-10 batches"):
        load_cifar10(tmp_path, "train")


def test_load_cifar10_refuses_labels_out_of_range(cifar_py, py2_pickle):
    data = np.zeros((2, 3072), np.uint8)
    (cifar_py / "test_batch").write_bytes(py2_pickle({b"data": data, b"labels": [3, 10]}))
    with pytest.raises(GoodnetError, match=r"test_batch: labels must lie in \[0, 9\]"):
        load_cifar10(cifar_py, "test")


@pytest.mark.parametrize("label", [2**70, -(2**70), 2**63, -1])
def test_load_cifar10_refuses_labels_beyond_any_integer_type(cifar_py, py2_pickle, label):
    data = np.zeros((2, 3072), np.uint8)
    (cifar_py / "test_batch").write_bytes(py2_pickle({b"data": data, b"labels": [3, label]}))
    with pytest.raises(GoodnetError, match=r"test_batch: labels must lie in \[0, 9\]"):
        load_cifar10(cifar_py, "test")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "1 labels for 2 images"),
        ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [1, 2]}, "data must be N x 3072"),
        ({b"labels": [1]}, "needs an array 'data'"),
        ([1, 2, 3], "holds list"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"cat"]}, "one integer label"),
    ],
)
def test_read_cifar_pickle_refuses_batches_of_the_wrong_shape(tmp_path, py2_pickle, batch,
                                                              message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_pickle(batch))
    with pytest.raises(GoodnetError, match=message):
        read_cifar_pickle(path)


class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _OpensAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", ["system", "open"])
def test_read_cifar_pickle_refuses_a_malicious_pickle_without_running_it(tmp_path, protocol,
                                                                         payload):
    marker = tmp_path / "pwned"
    evil = (_RunsACommand(f"touch {marker}") if payload == "system"
            else _OpensAFile(str(marker)))
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": evil, b"labels": [0]}, protocol=protocol))
    with pytest.raises(GoodnetError, match="refusing to load: global") as error:
        read_cifar_pickle(path)
    assert not marker.exists()
    assert str(path) in str(error.value)


def test_read_cifar_pickle_refuses_a_python2_style_global(tmp_path):
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02cposix\nsystem\nq\x01U" + bytes([len(command)]) + command
                     + b"\x85R.")
    with pytest.raises(GoodnetError, match=r"refusing to load: global posix\.system"):
        read_cifar_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", [b"dtype.__class__", b"ndarray.__init__"])
def test_read_cifar_pickle_refuses_dotted_names_under_admitted_modules(tmp_path, name):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x04\x8c\x05numpy\x8c" + bytes([len(name)]) + name + b"\x93.")
    with pytest.raises(GoodnetError, match=f"global numpy.{name.decode()}"):
        read_cifar_pickle(path)


@pytest.mark.parametrize(
    "target", [b"numpy.core.multiarray\n_reconstruct", b"numpy\ndtype", b"numpy\nndarray"])
def test_read_cifar_pickle_cannot_set_attributes_on_admitted_globals(tmp_path, target):
    # GLOBAL, then BUILD with (None, {"__defaults__": (1,)}): a slot-state write, if allowed.
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02c" + target + b"\nN}U\x0c__defaults__K\x01\x85s\x86b.")
    with pytest.raises(GoodnetError, match="not a CIFAR-10 batch"):
        read_cifar_pickle(path)
    for admitted in cifar_module._ALLOWED.values():
        assert getattr(admitted, "__defaults__", None) is None


def test_read_cifar_pickle_refuses_a_python3_protocol_2_pickle(tmp_path, cifar):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": cifar.test_data, b"labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(GoodnetError, match=r"global _codecs\.encode"):
        read_cifar_pickle(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"U\x02u1", b"U\x02|O", "array type b'|O'"),  # an object array
        (b"U\x02u1", b"U\x02f8", "array type b'f8'"),
        (b"cnumpy\nndarray\n", b"cnumpy\ndtype\n", "malformed array"),
    ],
)
def test_read_cifar_pickle_refuses_admitted_globals_used_for_something_else(
        tmp_path, py2_pickle, old, new, message):
    content = py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    assert old in content
    path = tmp_path / "data_batch_1"
    path.write_bytes(content.replace(old, new, 1))
    with pytest.raises(GoodnetError, match=message):
        read_cifar_pickle(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x04\x8e" + struct.pack("<Q", 10**12) + b"abc.", "expected 1000000000000 bytes"),
        (b"\x80\x02]r\xff\xff\xff\x7f.", "memo index 2147483647 beyond the file's size"),
        (b"\x80\x02}q\x01(U\x04dataq", "not a CIFAR-10 batch"),
        (b"", "not a CIFAR-10 batch"),
    ],
)
def test_read_cifar_pickle_refuses_impossible_sizes_and_truncation(tmp_path, content, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(GoodnetError, match=message):
        read_cifar_pickle(path)


def test_read_cifar_pickle_refuses_a_truncated_genuine_batch(cifar_py):
    content = (cifar_py / "test_batch").read_bytes()
    for length in (len(content) // 2, len(content) - 1):
        (cifar_py / "test_batch").write_bytes(content[:length])
        with pytest.raises(GoodnetError, match="test_batch: not a CIFAR-10 batch"):
            load_cifar10(cifar_py, "test")


def test_read_cifar_pickle_refuses_an_array_whose_bytes_do_not_match_its_shape(tmp_path,
                                                                              py2_pickle):
    content = py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    shape = b"K\x02M\x00\x0c\x86"
    assert shape in content
    path = tmp_path / "data_batch_1"
    path.write_bytes(content.replace(shape, b"K\x03M\x00\x0c\x86", 1))
    with pytest.raises(GoodnetError, match=r"array of shape \(3, 3072\) with 6144 bytes"):
        read_cifar_pickle(path)


def test_load_cifar10_binary_refuses_a_file_of_partial_records(cifar_bin):
    path = cifar_bin / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(GoodnetError, match="is not a whole number of 3073-byte records"):
        load_cifar10(cifar_bin, "test")


def test_load_cifar10_binary_refuses_labels_out_of_range(cifar_bin):
    path = cifar_bin / "test_batch.bin"
    content = bytearray(path.read_bytes())
    content[3073] = 10  # the label byte of the second record
    path.write_bytes(bytes(content))
    with pytest.raises(GoodnetError, match=r"test_batch.bin: labels must lie in \[0, 9\]"):
        load_cifar10(cifar_bin, "test")


def test_load_cifar10_prefers_the_python_version_when_both_are_present(cifar_py, cifar):
    (cifar_py / "test_batch.bin").write_bytes(bytes(3073))
    assert load_cifar10(cifar_py, "test").labels.tolist() == cifar.test_labels
