"""Image folders: class order, channels, pixel-exact PNG reads, and refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from goodnet.data import load_folder
from goodnet.errors import GoodnetError
from tests.data.conftest import png_header


def _save(path, array: np.ndarray, mode: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_load_folder_reads_grey_png_pixel_exactly_in_sorted_class_order(tmp_path):
    cat, dog = np.zeros((4, 6), np.uint8), np.zeros((4, 6), np.uint8)
    cat[1, 5] = 200  # row 1, column 5
    dog[3, 0] = 99
    _save(tmp_path / "dog" / "b.png", dog)
    _save(tmp_path / "dog" / "a.png", cat)
    _save(tmp_path / "cat" / "z.png", cat)
    (tmp_path / "cat" / "notes.txt").write_text("skipped")
    (tmp_path / "empty").mkdir()
    data = load_folder(tmp_path)
    assert data.images.shape == (3, 1, 4, 6)
    assert data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 1]  # cat, dog (a.png, b.png)
    assert data.images[0, 0, 1, 5] == 200 and int(data.images[0].sum()) == 200
    assert data.images[2, 0, 3, 0] == 99
    assert data.num_classes == 3  # an empty class folder still counts
    assert data.name == tmp_path.name


def test_load_folder_reads_rgb_channels_first(tmp_path):
    pixels = np.zeros((3, 5, 3), np.uint8)
    pixels[2, 4] = (10, 20, 30)
    _save(tmp_path / "only" / "x.PNG", pixels)
    data = load_folder(tmp_path)
    assert data.images.shape == (1, 3, 3, 5)
    assert data.images[0, :, 2, 4].tolist() == [10, 20, 30]


def test_load_folder_converts_other_modes_to_rgb(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 1] = (1, 2, 3, 255)
    _save(tmp_path / "a" / "rgba.png", rgba, "RGBA")
    _save(tmp_path / "a" / "rgb.png", np.full((2, 2, 3), 7, np.uint8))
    data = load_folder(tmp_path)
    assert data.images.shape == (2, 3, 2, 2)
    assert data.images[1, :, 0, 1].tolist() == [1, 2, 3]


def test_load_folder_decodes_jpeg(tmp_path):
    _save(tmp_path / "a" / "grey.jpg", np.full((8, 8), 128, np.uint8))
    data = load_folder(tmp_path)
    assert data.images.shape == (1, 1, 8, 8)
    assert abs(int(data.images[0, 0, 4, 4]) - 128) <= 2


def test_load_folder_names_the_image_of_another_size(tmp_path):
    _save(tmp_path / "a" / "1.png", np.zeros((4, 4), np.uint8))
    odd = _save(tmp_path / "b" / "2.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(GoodnetError, match="5x4 pixels, but the images before it are 4x4") as error:
        load_folder(tmp_path)
    assert str(odd) in str(error.value)


def test_load_folder_refuses_mixed_channels(tmp_path):
    _save(tmp_path / "a" / "1.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "a" / "2.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(GoodnetError, match=r"2\.png: 3 channel"):
        load_folder(tmp_path)


def test_load_folder_refuses_a_file_that_is_not_an_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fake.png").write_bytes(b"not a png")
    with pytest.raises(GoodnetError, match=r"fake\.png: cannot read as PNG or JPEG"):
        load_folder(tmp_path)


def test_load_folder_refuses_a_truncated_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    path = _save(tmp_path / "a" / "cut.png", noise)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GoodnetError, match=r"cut\.png: cannot read"):
        load_folder(tmp_path)


def test_load_folder_refuses_other_formats_named_png(tmp_path):
    path = tmp_path / "a" / "really.png"
    path.parent.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path, format="BMP")
    with pytest.raises(GoodnetError, match=r"really\.png: cannot read as PNG or JPEG"):
        load_folder(tmp_path)


@pytest.mark.parametrize(
    ("layout", "message"),
    [("missing", "no such folder"), ("no classes", "no class subfolders"),
     ("no images", "no PNG or JPEG images")],
)
def test_load_folder_refuses_folders_without_images(tmp_path, layout, message):
    if layout == "no images":
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(GoodnetError, match=message):
        load_folder(tmp_path / "absent" if layout == "missing" else tmp_path)


def test_load_folder_refuses_a_huge_header_before_decoding_and_without_a_warning(tmp_path):
    # 120 megapixels: under Pillow's error threshold, so Pillow would warn, then decode.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(png_header(12000, 10000, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(GoodnetError, match=r"0\.png: the image has more pixels than goodnet "
                                               r"decodes"):
            load_folder(tmp_path)
    assert [str(w.message) for w in caught] == []
