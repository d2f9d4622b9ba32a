"""Single image files for ``goodnet predict``: exact pixels, and hostile files refused cheaply."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from goodnet.data.images import read_image
from goodnet.errors import GoodnetError
from tests.bounded import assert_refused_cheaply, measure
from tests.data.conftest import png_header, ppm_header


def test_read_image_reads_pixels_exactly(tmp_path):
    pixels = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png", (1, 16, 16))
    assert image.shape == (1, 16, 16)
    assert (image[0] * 255).round().byte().numpy().tolist() == pixels.tolist()


@pytest.mark.parametrize("content", [ppm_header(60000, 60000), png_header(20000, 10000),
                                     ppm_header(12000, 12000), png_header(12000, 10000, 2)],
                         ids=["ppm-3.6G", "png-200M", "ppm-144M", "png-120M"])
def test_read_image_refuses_a_huge_header_without_a_pillow_warning(tmp_path, content):
    path = tmp_path / "huge.img"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(GoodnetError, match=r"huge\.img: the image has more pixels than "
                                               r"goodnet decodes \(Image size \(\d+ pixels\)"):
            read_image(path, (3, 16, 16))
    assert [str(w.message) for w in caught] == []


def test_read_image_refuses_huge_headers_and_pipes_cheaply(tmp_path):
    # 144 and 120 megapixels lie under Pillow's error threshold: it would warn, then decode.
    paths = {}
    headers = {"ppm": ppm_header(12000, 12000), "png": png_header(12000, 10000, 2),
               "ppm_bomb": ppm_header(60000, 60000), "ppm_64M": ppm_header(8000, 8000)}
    for name, content in headers.items():
        paths[name] = tmp_path / f"{name}.img"
        paths[name].write_bytes(content)
    match = dict.fromkeys(paths, "the image has more pixels than goodnet decodes")
    match["ppm_64M"] = "the image is 8000×8000 (W×H) but the model takes 16×16"
    # Opening a pipe with no writer blocks forever: the child is killed after 20 s.
    paths["fifo"] = tmp_path / "pipe.png"
    os.mkfifo(paths["fifo"])
    match["fifo"] = "not a regular file"
    results = measure({name: f"read_image({str(path)!r}, (3, 16, 16))"
                       for name, path in paths.items()},
                      setup="from goodnet.data.images import read_image", timeout=20)
    assert_refused_cheaply(results, match=match, seconds=3)


def test_read_image_refuses_formats_that_run_external_programs(tmp_path, monkeypatch):
    # Pillow hands EPS to Ghostscript: a program interpreting PostScript from the file.
    from PIL import EpsImagePlugin

    handed = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kw: handed.append(args))
    path = tmp_path / "x.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    with pytest.raises(GoodnetError, match=r"x\.eps: cannot read as PNG, JPEG"):
        read_image(path, (1, 16, 16))
    assert handed == []


def test_read_image_names_a_missing_file(tmp_path):
    with pytest.raises(GoodnetError, match=r"absent\.png: no such file"):
        read_image(tmp_path / "absent.png", (1, 16, 16))
