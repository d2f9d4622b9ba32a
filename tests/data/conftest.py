"""Writers of tiny data files in the official layouts, shared by the data tests."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import idx_bytes


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every data test gets its own empty cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("GOODNET_CACHE", str(folder))
    return folder


@pytest.fixture
def write_idx() -> Callable[[Path, np.ndarray], Path]:
    """Writes an array as an IDX file, gzipped when the name ends in ``.gz``."""

    def write(path: Path, array: np.ndarray) -> Path:
        content = idx_bytes(array)
        path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
        return path

    return write


class Py2Pickler:
    """Writes protocol 2 the way Python 2's cPickle did when CIFAR-10 was made.

    Python 2 ``str`` (``bytes`` here) goes out as SHORT_BINSTRING / BINSTRING, every object is
    memoized, and a NumPy array is reduced as NumPy 1.x did it: ``_reconstruct`` from
    ``numpy.core.multiarray``, then a BUILD with ``(1, shape, dtype, is_fortran, raw bytes)``.
    Python 3's own pickler cannot write this: at protocol 2 it encodes bytes through
    ``_codecs.encode``, which the genuine files never name.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def dumps(self, obj: object) -> bytes:
        self.write(obj)
        return bytes(self.out + b".")

    def put(self) -> None:
        self.out += (b"q" + bytes([self.memo]) if self.memo < 256
                     else b"r" + struct.pack("<I", self.memo))
        self.memo += 1

    def glob(self, module: str, name: str) -> None:
        self.out += f"c{module}\n{name}\n".encode()
        self.put()

    def write(self, obj: object) -> None:
        if obj is None:
            self.out += b"N"
        elif isinstance(obj, bool):
            self.out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                self.out += b"K" + bytes([obj])
            elif 0 <= obj < 65536:
                self.out += b"M" + struct.pack("<H", obj)
            elif -(2**31) <= obj < 2**31:
                self.out += b"J" + struct.pack("<i", obj)
            else:  # a Python 2 long: LONG1, little-endian two's complement
                raw = obj.to_bytes(obj.bit_length() // 8 + 1, "little", signed=True)
                self.out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(obj, bytes):
            self.out += (b"U" + bytes([len(obj)]) if len(obj) < 256
                         else b"T" + struct.pack("<i", len(obj))) + obj
            self.put()
        elif isinstance(obj, tuple):
            if len(obj) <= 3:
                for item in obj:
                    self.write(item)
                self.out += [b")", b"\x85", b"\x86", b"\x87"][len(obj)]
            else:
                self.out += b"("
                for item in obj:
                    self.write(item)
                self.out += b"t"
            self.put()
        elif isinstance(obj, list | dict):
            self.out += b"]" if isinstance(obj, list) else b"}"
            self.put()
            if obj:
                self.out += b"("
                for item in obj.items() if isinstance(obj, dict) else obj:
                    for part in item if isinstance(obj, dict) else (item,):
                        self.write(part)
                self.out += b"u" if isinstance(obj, dict) else b"e"
        elif isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
            self.glob("numpy.core.multiarray", "_reconstruct")
            self.glob("numpy", "ndarray")
            self.write((0,))
            self.write(b"b")
            self.out += b"\x87R"
            self.put()
            self.out += b"(K\x01"
            self.write(tuple(obj.shape))
            self.glob("numpy", "dtype")
            self.write((b"u1", 0, 1))
            self.out += b"R"
            self.put()
            self.write((3, b"|", None, None, None, -1, -1, 0))
            self.out += b"b\x89"
            self.write(obj.tobytes())
            self.out += b"t"
            self.put()
            self.out += b"b"
        else:
            raise TypeError(f"cannot write {type(obj).__name__}")


def _py2_dumps(obj: object) -> bytes:
    return Py2Pickler().dumps(obj)


@pytest.fixture
def py2_pickle() -> Callable[[object], bytes]:
    """Pickles an object as Python 2's cPickle would have."""
    return _py2_dumps


def _cifar_batch(data: np.ndarray, labels: list[int], name: str) -> dict[bytes, object]:
    """A batch dict with the keys and types of the genuine files."""
    return {b"batch_label": name.encode(), b"labels": labels, b"data": data,
            b"filenames": [f"image_{i}.png".encode() for i in range(len(labels))]}


@dataclass
class Cifar:
    """Tiny CIFAR-10 batches: ``data`` rows as in the files, and their labels."""

    train_data: np.ndarray
    train_labels: list[int]
    test_data: np.ndarray
    test_labels: list[int]


@pytest.fixture
def cifar() -> Cifar:
    """Eleven training images (five batches) and three test images with planted pixels."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (11, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    # Image 0: red at row 1, column 2; green at row 0, column 0; blue at row 31, column 31.
    train[0, 0 * 1024 + 1 * 32 + 2] = 201
    train[0, 1 * 1024] = 77
    train[0, 3071] = 13
    return Cifar(train, [int(v) for v in rng.integers(0, 10, 11)],
                 test, [int(v) for v in rng.integers(0, 10, 3)])


_TRAIN_ROWS = [slice(0, 3), slice(3, 5), slice(5, 7), slice(7, 9), slice(9, 11)]


@pytest.fixture
def cifar_py(tmp_path: Path, cifar: Cifar) -> Path:
    """``cifar-10-batches-py`` with the ``cifar`` images, pickled as the genuine files are."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for number, rows in enumerate(_TRAIN_ROWS, start=1):
        batch = _cifar_batch(cifar.train_data[rows], cifar.train_labels[rows],
                            f"training batch {number} of 5")
        (folder / f"data_batch_{number}").write_bytes(_py2_dumps(batch))
    test = _cifar_batch(cifar.test_data, cifar.test_labels, "testing batch 1 of 1")
    (folder / "test_batch").write_bytes(_py2_dumps(test))
    (folder / "batches.meta").write_bytes(_py2_dumps(
        {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": 10000}))
    return folder


def _cifar_records(data: np.ndarray, labels: list[int]) -> bytes:
    """Records of the binary version: one label byte, then 3072 pixel bytes."""
    return np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1).tobytes()


@pytest.fixture
def cifar_bin(tmp_path: Path, cifar: Cifar) -> Path:
    """``cifar-10-batches-bin`` with the ``cifar`` images."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for number, rows in enumerate(_TRAIN_ROWS, start=1):
        (folder / f"data_batch_{number}.bin").write_bytes(
            _cifar_records(cifar.train_data[rows], cifar.train_labels[rows]))
    (folder / "test_batch.bin").write_bytes(_cifar_records(cifar.test_data, cifar.test_labels))
    return folder


def png_header(width: int, height: int, mode: int = 0, depth: int = 8) -> bytes:
    """A PNG that declares ``width`` × ``height`` (colour type ``mode``, ``depth`` bits) over at
    most one short row of data: a few hundred bytes whatever size it claims."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, depth, mode, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(1 + min(width, 256)))) + chunk(b"IEND", b""))


def ppm_header(width: int, height: int, magic: str = "P6", maxval: int = 255) -> bytes:
    """A binary PPM (P6; or another Netpbm kind by ``magic``) that declares ``width`` ×
    ``height`` pixels and holds 300 bytes of them."""
    return f"{magic}\n{width} {height}\n{maxval}\n".encode() + bytes(300)
