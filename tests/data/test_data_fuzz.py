"""Property tests: on random or damaged files, each binary loader either returns valid data or
raises GoodnetError -- never a raw NumPy, h5py, pickle, zipfile or Pillow exception."""

from __future__ import annotations

import contextlib
import gzip
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from goodnet.data import (
    ImageData,
    load_cifar10,
    load_csaw,
    load_folder,
    load_npz,
    read_idx,
    read_mnist_csv,
)
from goodnet.data.cifar import read_cifar_pickle
from goodnet.data.images import read_image
from goodnet.errors import GoodnetError
from tests.data.conftest import png_header, ppm_header

FUZZ = settings(max_examples=50, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _damaged(base: bytes, region: tuple[int, int] | None = None) -> st.SearchStrategy[bytes]:
    """Random bytes, or ``base`` with some bytes overwritten (within ``region``) and cut short."""
    low, high = region or (0, len(base))
    position = st.one_of(st.integers(low, min(low + 64, high) - 1), st.integers(low, high - 1))
    edits = st.lists(st.tuples(position, st.integers(0, 255)), max_size=8)
    length = st.one_of(st.just(len(base)), st.integers(0, len(base)))
    if region is not None:  # only the data region is damaged: keep the whole file
        length = st.just(len(base))
    return st.one_of(st.binary(max_size=600), st.builds(_apply, st.just(base), edits, length))


def _apply(base: bytes, edits: list[tuple[int, int]], length: int) -> bytes:
    damaged = bytearray(base)
    for position, value in edits:
        damaged[position] = value
    return bytes(damaged[:length])


def _outcome(load: Callable[..., object], *args: object) -> object:
    """What ``load`` returns, or None when it raises GoodnetError; anything else propagates."""
    with contextlib.suppress(GoodnetError):
        return load(*args)
    return None


def _idx_base() -> bytes:
    images = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    return bytes([0, 0, 8, 3]) + np.array([2, 5, 4], ">u4").tobytes() + images.tobytes()


@FUZZ
@given(content=_damaged(_idx_base()), gzipped=st.booleans())
def test_read_idx_raises_only_goodnet_errors(tmp_path, content, gzipped):
    path = tmp_path / ("x-idx3-ubyte.gz" if gzipped else "x-idx3-ubyte")
    path.write_bytes(gzip.compress(content) if gzipped else content)
    result = _outcome(read_idx, path)
    assert result is None or (isinstance(result, np.ndarray) and result.dtype.isnative)


@FUZZ
@given(content=_damaged(gzip.compress(_idx_base(), mtime=0)))
def test_read_idx_raises_only_goodnet_errors_on_damaged_gzip(tmp_path, content):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(content)
    result = _outcome(read_idx, path)
    assert result is None or isinstance(result, np.ndarray)


@FUZZ
@given(data=st.data())
def test_read_cifar_pickle_raises_only_goodnet_errors(tmp_path, py2_pickle, data):
    pixels = np.arange(3072, dtype=np.uint16).astype(np.uint8).reshape(1, 3072)
    base = py2_pickle({b"data": pixels, b"labels": [3], b"batch_label": b"b", b"filenames": []})
    path = tmp_path / "data_batch_1"
    path.write_bytes(data.draw(_damaged(base)))
    result = _outcome(read_cifar_pickle, path)
    assert result is None or result[0].shape[1:] == (3, 32, 32)


@FUZZ
@given(content=_damaged(bytes([3]) + bytes(range(256)) * 12))
def test_load_cifar10_binary_raises_only_goodnet_errors(cifar_bin, content):
    (cifar_bin / "test_batch.bin").write_bytes(content)
    result = _outcome(load_cifar10, cifar_bin, "test")
    assert result is None or isinstance(result, ImageData)


def _h5_base() -> tuple[bytes, tuple[int, int]]:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        dataset = file.create_dataset("data", data=np.full((2, 3, 5, 4), 17.0))
        file.create_dataset("label", data=np.array([1, 2]))
        offset = dataset.id.get_offset()
    return buffer.getvalue(), (offset, offset + 2 * 3 * 5 * 4 * 8)


@FUZZ
@given(data=st.data())
def test_load_csaw_raises_only_goodnet_errors(tmp_path, data):
    # libhdf5 is not hardened against damaged metadata, so only random bytes, damage to the
    # raw pixel data and truncation are tried here.
    base, region = _h5_base()
    truncated = st.integers(0, len(base) - 1).map(lambda length: base[:length])
    path = tmp_path / "faces.h5"
    path.write_bytes(data.draw(st.one_of(_damaged(base, region), truncated)))
    result = _outcome(load_csaw, path)
    assert result is None or isinstance(result, ImageData)


def _npz_base() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.full((2, 4, 4), 9, np.uint8), y=np.array([0, 1]))
    return buffer.getvalue()


@FUZZ
@given(content=_damaged(_npz_base()))
def test_load_npz_raises_only_goodnet_errors(tmp_path, content):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    result = _outcome(load_npz, path)
    assert result is None or isinstance(result, ImageData)


def _csv_base() -> bytes:
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    row = ",".join(["4"] + [str(v % 256) for v in range(784)])
    return f"{header}\r\n{row}\r\n{row}\r\n".encode()


@FUZZ
@given(content=_damaged(_csv_base()))
def test_read_mnist_csv_raises_only_goodnet_errors(tmp_path, content):
    path = tmp_path / "mnist_test.csv"
    path.write_bytes(content)
    result = _outcome(read_mnist_csv, path)
    assert result is None or isinstance(result, ImageData)


def _png_base() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@FUZZ
@given(content=_damaged(_png_base()))
def test_load_folder_raises_only_goodnet_errors(tmp_path, content):
    path = Path(tmp_path / "images" / "class" / "x.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    result = _outcome(load_folder, tmp_path / "images")
    assert result is None or isinstance(result, ImageData)


# Structured mutations: valid headers whose fields take any value, not only random bytes.
_SIDE = st.one_of(st.just(16), st.integers(0, 64), st.integers(0, 2**31 - 1))


# (colour type, bit depth): mostly valid pairs, so that the sizes are what gets tested.
_PNG_KIND = st.one_of(st.sampled_from([(0, 8), (2, 8), (6, 16)]),
                      st.tuples(st.sampled_from([0, 1, 2, 3, 4, 6, 255]),
                                st.sampled_from([0, 1, 2, 4, 8, 16, 255])))


@FUZZ
@given(width=_SIDE, height=_SIDE, kind=_PNG_KIND, channels=st.sampled_from([1, 3]))
def test_read_image_on_any_png_header_raises_only_goodnet_errors(tmp_path, width, height, kind,
                                                                 channels):
    path = tmp_path / "x.png"
    path.write_bytes(png_header(width, height, *kind))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning is a failure too
        result = _outcome(read_image, path, (channels, 16, 16))
    assert result is None or result.shape == (channels, 16, 16)


@FUZZ
@given(width=st.one_of(_SIDE, st.integers(2**31, 10**30)), height=_SIDE,
       magic=st.sampled_from(["P1", "P2", "P3", "P4", "P5", "P6", "P7", "Pf"]),
       maxval=st.one_of(st.just(255), st.integers(0, 2**20)))
def test_read_image_on_any_netpbm_header_raises_only_goodnet_errors(tmp_path, width, height,
                                                                    magic, maxval):
    path = tmp_path / "x.ppm"
    path.write_bytes(ppm_header(width, height, magic, maxval))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = _outcome(read_image, path, (3, 16, 16))
    assert result is None or result.shape == (3, 16, 16)


_LABEL = st.one_of(st.integers(0, 9), st.integers(-(2**80), 2**80), st.booleans(), st.none(),
                   st.binary(max_size=3))


@FUZZ
@given(labels=st.lists(_LABEL, min_size=0, max_size=3))
def test_read_cifar_pickle_on_any_labels_raises_only_goodnet_errors(tmp_path, py2_pickle,
                                                                     labels):
    pixels = np.zeros((2, 3072), np.uint8)
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_pickle({b"data": pixels, b"labels": labels}))
    result = _outcome(read_cifar_pickle, path)
    assert result is None or (len(result[1]) == 2 and all(0 <= v < 10 for v in result[1]))
