"""``.npz`` data sets: every accepted layout, round trips, and refusals."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from goodnet.data import ImageData, load_npz, save_npz
from goodnet.errors import GoodnetError
from tests.bounded import assert_refused_cheaply, measure


def _planted(channels: int) -> np.ndarray:
    """Four 5 x 6 images, channels first, with one known pixel per channel."""
    images = np.zeros((4, channels, 5, 6), np.uint8)
    for c in range(channels):
        images[1, c, 2, 3 + c % 3] = 10 + c
    images[3, channels - 1, 4, 5] = 255
    return images


@pytest.mark.parametrize(
    ("layout", "channels"),
    [("NHW", 1), ("NHWC", 1), ("NHWC", 3), ("NCHW", 1), ("NCHW", 3)],
)
def test_load_npz_reads_each_layout_channels_first(tmp_path, layout, channels):
    expected = _planted(channels)
    stored = {"NHW": expected[:, 0], "NHWC": expected.transpose(0, 2, 3, 1),
              "NCHW": expected}[layout]
    path = tmp_path / "data.npz"
    np.savez(path, x=stored, y=np.array([0, 2, 1, 2]))
    data = load_npz(path)
    assert data.images.shape == (4, channels, 5, 6)
    assert data.images.dtype == torch.uint8
    assert data.images[1, channels - 1, 2, 3 + (channels - 1) % 3] == 10 + channels - 1
    assert data.images[3, channels - 1, 4, 5] == 255
    assert torch.equal(data.images, torch.from_numpy(expected))
    assert data.labels.tolist() == [0, 2, 1, 2]
    assert data.num_classes == 3 and data.name == "data.npz"


def test_load_npz_keeps_floats_in_0_1_and_takes_num_classes(tmp_path):
    x = np.linspace(0, 1, 4 * 3 * 2 * 2, dtype=np.float64).reshape(4, 2, 2, 3)
    path = tmp_path / "floats.npz"
    np.savez_compressed(path, x=x, y=np.array([0, 1, 0, 1]))
    data = load_npz(path, num_classes=10)
    assert data.images.dtype == torch.float32 and data.num_classes == 10
    assert torch.allclose(data.images, torch.from_numpy(x.transpose(0, 3, 1, 2)).float())


def test_save_npz_round_trips_exactly(tmp_path):
    images = torch.from_numpy(_planted(3))
    path = tmp_path / "saved.npz"
    save_npz(path, ImageData(images, torch.tensor([4, 0, 1, 2]), 7, "original"))
    with np.load(path) as arrays:
        assert arrays["x"].shape == (4, 3, 5, 6)
    loaded = load_npz(path, num_classes=7)
    assert torch.equal(loaded.images, images)
    assert loaded.labels.tolist() == [4, 0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["saved.npz"]


def test_save_npz_refuses_a_missing_folder(tmp_path):
    data = ImageData(torch.from_numpy(_planted(1)), torch.tensor([0, 0, 0, 0]), 1)
    with pytest.raises(GoodnetError, match="cannot write"):
        save_npz(tmp_path / "absent" / "saved.npz", data)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.full((2, 4, 4), 256), [0, 1], "must lie in 0..255"),
        (np.full((2, 4, 4), 1.5), [0, 1], "with fractions"),
        (np.zeros((2, 4, 4, 2)), [0, 1], r"got shape \(2, 4, 4, 2\)"),
        (np.zeros((2, 16)), [0, 1], r"got shape \(2, 16\)"),
        (np.zeros((2, 4, 4)), [0, 1, 2], "one label per image"),
        (np.zeros((2, 4, 4)), [0.0, 1.0], "y must be integer labels"),
        (np.zeros((2, 4, 4)), [0, -1], r"labels must lie in \[0, 0\]"),
        (np.array([["a"] * 4] * 2), [0, 1], "pixels must be numbers"),
    ],
    ids=["256", "fraction", "two channels", "flat", "label count", "float labels",
         "negative label", "strings"],
)
def test_load_npz_refuses_bad_content(tmp_path, x, y, message):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.array(y))
    with pytest.raises(GoodnetError, match=message) as error:
        load_npz(path)
    assert str(path) in str(error.value)


def test_load_npz_refuses_pickled_object_arrays(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(GoodnetError, match="holds Python objects"):
        load_npz(path)


def test_load_npz_names_a_missing_array(tmp_path):
    path = tmp_path / "images_only.npz"
    np.savez(path, images=np.zeros((1, 2, 2)), y=np.array([0]))
    with pytest.raises(GoodnetError, match="no array 'x' \\(the file has: images, y\\)"):
        load_npz(path)


def _npz_with_member(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def test_load_npz_refuses_a_header_declaring_more_than_the_file_holds(tmp_path):
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (1000000, 1000, 1000), }"
    header = header.ljust(118) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(64)
    path = tmp_path / "huge.npz"
    path.write_bytes(_npz_with_member("x.npy", member))
    with pytest.raises(GoodnetError, match=r"declares shape \(1000000, 1000, 1000\)"):
        load_npz(path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04" + bytes(40), b"\x93NUMPY" + bytes(50)])
def test_load_npz_refuses_files_that_are_not_npz(tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(GoodnetError, match=r"cannot read as \.npz"):
        load_npz(path)


def test_load_npz_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez(path, x=_planted(3), y=np.arange(4))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(GoodnetError, match=r"cannot read as \.npz"):
        load_npz(path)


def _deflated_zeros_npz(path, shape) -> None:
    """An ``.npz`` whose ``x`` is uint8 zeros of ``shape``, deflated at about 1000 to 1 without
    ever holding the array: one compressed MiB of zeros, repeated (after a full flush the
    compressor starts afresh, so each MiB compresses to the same bytes), then the rest."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                 "shape": shape})
    mib, zeros = 1 << 20, bytes(1 << 20)
    count, rest = divmod(int(np.prod(shape)), mib)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(header.getvalue()) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = head + block * count + compressor.compress(bytes(rest)) + compressor.flush()
    crc = zlib.crc32(header.getvalue())
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(bytes(rest), crc)
    size, name = len(header.getvalue()) + count * mib + rest, b"x.npy"
    fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, len(stream), size)
    local = b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name
    central = b"PK\x01\x02" + struct.pack("<H", 20) + fields + \
        struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, 0) + name
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central),
                                       len(local) + len(stream), 0)
    path.write_bytes(local + stream + central + end)
    with zipfile.ZipFile(path, "a") as archive:  # one label per image
        labels = io.BytesIO()
        np.lib.format.write_array(labels, np.zeros(shape[0], np.int64))
        archive.writestr("y.npy", labels.getvalue())


def test_a_small_npz_declaring_a_huge_image_is_refused_before_inflating(tmp_path):
    """A 2 MB file holding one 46000×46000 image of zeros (2 GB inflated; within deflate's
    1032-to-1 bound, so its ZIP sizes are consistent) is refused from its header: before the
    fix NumPy inflated the 2 GB first."""
    path = tmp_path / "bomb.npz"
    _deflated_zeros_npz(path, (1, 46000, 46000))
    assert path.stat().st_size < 3 * 2**20
    with zipfile.ZipFile(path) as archive:  # a well-formed archive: sizes, CRC, both arrays
        assert archive.getinfo("x.npy").file_size > 2 * 10**9
        assert sorted(archive.namelist()) == ["x.npy", "y.npy"]
    results = measure({"bomb": f"load_npz({str(path)!r})"},
                      setup="from goodnet.data import load_npz")
    assert_refused_cheaply(results, match={"bomb": "1×46000×46000 (C×H×W) is larger than"})
