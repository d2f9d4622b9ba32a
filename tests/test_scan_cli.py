"""``goodnet scan`` end to end (Neural Cleanse on the planted small CNN, saved as a goodnet file)
and the files it writes: the printed verdict, scan.json, the pictures, the page in a browser,
other model formats, and one-line errors that leave no folder behind. (The data-free default
without --clean runs MM-BD, tested with that scanner.)"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from goodnet.artifacts import ModelCard, load_model, save_model
from goodnet.cli import main
from goodnet.data.dataset import ImageData
from goodnet.defenses.base import ScanVerdict, Trigger
from goodnet.models import spec_for_data
from goodnet.scan_output import write_scan
from goodnet.scans import SCANNERS, ScanReport
from goodnet.triggers import load_triggers
from goodnet.version import __version__
from tests.conftest import stripes
from tests.keras_files import small_functional, write_keras2
from tests.test_bench import chromium


def _npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, x=images, y=labels)
    return path


def _noise(n: int, classes: int, size: int) -> ImageData:
    """Random greyscale images, labels cycling through the classes."""
    pixels = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return ImageData(pixels, torch.arange(n) % classes, classes, f"noise[{n}]")


@pytest.fixture(scope="module")
def files(backdoored, tmp_path_factory):
    """The planted small CNN as a goodnet file (target class 1) and its clean data as .npz."""
    model, clean, _, attack = backdoored
    folder = tmp_path_factory.mktemp("inputs")
    card = ModelCard(spec=spec_for_data("small_cnn", stripes(800, seed=0)),
                     attack=attack.describe())
    model_file = save_model(folder / "bd.safetensors", model, card)
    return model_file, _npz(folder / "clean.npz", clean.images.numpy(), clean.labels.numpy())


def _scan(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--no-progress", "scan", *argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def scanned(files, tmp_path_factory):
    model_file, clean_file = files
    out = tmp_path_factory.mktemp("scan") / "out"
    code, printed = _scan([str(model_file), "--clean", str(clean_file), "-p", "epochs=3",
                           "--out", str(out)])
    assert code == 0
    return out, printed


def test_scan_prints_the_verdict_target_and_trigger(files, scanned):
    out, printed = scanned
    summary = json.loads((out / "scan.json").read_text())
    verdict = summary["verdict"]
    trigger = verdict["triggers"][1]
    assert printed.splitlines() == [
        f"nc scan of {files[0]}: 4 classes, 200 clean images (clean.npz), "
        f"{summary['seconds']:.1f} s",
        f"verdict: BACKDOORED (anomaly index {verdict['score']:.2f} > threshold 2)",
        "suspected target class: 1",
        f"  class 1: anomaly index {verdict['scores'][1]:.2f}, reversed trigger's mask norm "
        f"{trigger['norm']:.1f}, success {100 * trigger['success']:.1f} %",
        f"wrote 5 files to {out} (open {out / 'scan.html'})"]


def test_scan_json_records_the_verdict_and_the_files(files, scanned):
    out, _ = scanned
    summary = json.loads((out / "scan.json").read_text())
    assert summary["model"] == "bd.safetensors" and summary["goodnet_version"] == __version__
    assert summary["scanner"] == "nc" and summary["settings"]["epochs"] == 3
    assert summary["classes"] == 4 and summary["clean_images"] == 200
    assert summary["clean_data"] == "clean.npz" and summary["seconds"] > 0
    verdict = summary["verdict"]
    assert verdict["backdoored"] and verdict["targets"] == [1]
    assert verdict["score_name"] == verdict["scores_name"] == "anomaly index"
    assert verdict["threshold"] == 2.0
    assert verdict["score"] == max(verdict["scores"]) == verdict["scores"][1] > 2
    assert [t["target"] for t in verdict["triggers"]] == [0, 1, 2, 3]
    assert summary["notes"]["norms"] == [t["norm"] for t in verdict["triggers"]]
    assert summary["pictures"] == [{"class": 1, "flagged": True, "file": "class-1.png"}]
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir()) == [
        "class-1.png", "scan.html", "scan.json", "triggers.png", "triggers.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary folder left
    saved = load_triggers(out / "triggers.safetensors")
    assert list(saved.scores) == verdict["scores"] and saved.targets == (1,)
    assert saved.triggers[1].norm == verdict["triggers"][1]["norm"]


def test_the_pictures_decode(scanned):
    out, _ = scanned
    for name in ("class-1.png", "triggers.png"):
        with Image.open(out / name) as image:
            image.load()
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10, name  # a picture, not a blank page
    with Image.open(out / "class-1.png") as image:
        width, height = image.size
    assert width > 5 * height  # mask, pattern, mask × pattern and four stamped images in a row


def test_the_page_renders_in_headless_chromium(scanned, tmp_path):
    """As the report's page test in test_bench: every image decoded, the table has its rows."""
    out, _ = scanned
    page = (out / "scan.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"] * 3
    assert "BACKDOORED" in page and "bd.safetensors" in page
    browser = chromium()
    if browser is None:
        assert os.environ.get("GOODNET_REQUIRE_BROWSER") != "1", "Chromium is required here"
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    probe = page.replace("</body>", """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const ok = images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);
  const rows = document.querySelectorAll('table tr').length;
  const flagged = document.querySelectorAll('tr.flagged').length;
  document.body.setAttribute('data-probe',
                             `images=${images.length} ok=${ok} rows=${rows} flagged=${flagged}`);
});
</script></body>""")
    target = tmp_path / "probe.html"
    target.write_text(probe)
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=5000", "--dump-dom", target.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    assert 'data-probe="images=3 ok=true rows=5 flagged=1"' in result.stdout, result.stderr[-500:]


def test_no_backdoor_found_pictures_the_most_suspicious_class(files, scanned, tmp_path):
    """A threshold nothing passes: the verdict says so, and the most suspicious class is
    pictured, marked as not flagged; written into a copy of the folder, replacing its files."""
    out = tmp_path / "again"
    shutil.copytree(scanned[0], out)
    code, printed = _scan([str(files[0]), "--clean", str(files[1]), "-p", "epochs=1",
                           "-p", "anomaly_threshold=1000", "--scanner", "nc", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "scan.json").read_text())
    assert f"verdict: no backdoor found (anomaly index {summary['verdict']['score']:.2f} <= " \
           "threshold 1000)" in printed
    assert "suspected target" not in printed
    assert summary["settings"]["epochs"] == 1 and not summary["verdict"]["backdoored"]
    scores = summary["verdict"]["scores"]
    top = max(range(4), key=lambda k: scores[k])
    assert f"most suspicious class, not flagged: {top} (" in printed
    assert summary["pictures"] == [{"class": top, "flagged": False, "file": f"class-{top}.png"}]
    assert "not flagged" in (out / "scan.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"])


def _report(classes: int, targets: tuple[int, ...], *, triggers: bool,
            scores: list[float] | None = None, score: float | None = None) -> ScanReport:
    """A hand-made report: per-class triggers (a square at the class's column) or per-class
    images (MM-BD's kind), for the writer alone; the score is the largest per-class value
    unless given."""
    scores = scores or [float(k in targets) * 5 for k in range(classes)]
    found = []
    for k in range(classes):
        mask = torch.zeros(1, 8, 8)
        mask[0, 6:8, k:k + 2] = 1.0
        found.append(Trigger(k, mask, torch.ones(1, 8, 8), float(mask.sum()), 0.9))
    verdict = ScanVerdict(backdoored=bool(targets), targets=targets,
                          score=max(scores) if score is None else score,
                          threshold=3.0, scores=tuple(scores),
                          triggers=tuple(found) if triggers else ())
    images = () if triggers else tuple(torch.rand(3, 8, 8) for _ in range(classes))
    return ScanReport(scanner="hand", settings={"note": "<b>"}, verdict=verdict,
                      score_name="-log10 p", classes=classes, clean_images=0, seconds=0.5,
                      images=images, notes={"nan": math.nan, "tensor": torch.ones(2)})


def test_a_scanner_with_images_and_a_rewrite_that_drops_a_picture(tmp_path):
    out = tmp_path / "scan"
    # As MM-BD: an image per class, per-class values on another scale than the score.
    written = write_scan(_report(3, (2,), triggers=False, score=4.0), out, None,
                         "<script>x</script>.h5")
    assert sorted(p.name for p in written) == ["class-2.png", "scan.html", "scan.json"]
    with Image.open(out / "class-2.png") as image:
        assert image.size[0] > 100
    summary = json.loads((out / "scan.json").read_text())
    assert summary["verdict"]["scores_name"] == "per-class statistic"
    assert summary["verdict"]["triggers"] == [] and summary["notes"] == {
        "nan": None, "tensor": [1.0, 1.0]}
    page = (out / "scan.html").read_text()
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;.h5" in page
    assert "<b>" not in page and "-log10 p" in page
    # Scanned again into the same folder: its files are replaced, the picture of class 2 that
    # this scan does not make is removed, and a file of the user's is kept.
    (out / "mine.txt").write_text("keep me")
    clean = _noise(12, 3, 8)
    write_scan(_report(3, (0,), triggers=True), out, clean, "m.safetensors")
    assert sorted(p.name for p in out.iterdir()) == [
        "class-0.png", "mine.txt", "scan.html", "scan.json", "triggers.png",
        "triggers.safetensors"]
    assert json.loads((out / "scan.json").read_text())["model"] == "m.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["scan"]


def test_infinite_scores_stay_valid_json(tmp_path):
    report = _report(3, (1,), triggers=True, scores=[0.0, math.inf, -math.inf])
    write_scan(report, tmp_path / "scan", None, "m.h5")
    verdict = json.loads((tmp_path / "scan" / "scan.json").read_text())["verdict"]
    assert verdict["scores"] == [0.0, None, None] and verdict["score"] is None


def test_keras_files_and_pytorch_checkpoints_are_scanned(files, tmp_path):
    config, weights = small_functional()  # 6×6 greyscale images, 3 classes
    keras = write_keras2(tmp_path / "net.h5", config, weights)
    small = _noise(30, 3, 6)
    keras_clean = _npz(tmp_path / "six.npz", small.images.numpy(), small.labels.numpy())
    state = {k: v for k, v in load_model(files[0]).model.state_dict().items()
             if not k.startswith("normalize.")}
    checkpoint = tmp_path / "net.pt"
    torch.save(state, checkpoint)
    for argv, classes in (([str(keras), "--clean", str(keras_clean)], 3),
                          ([str(checkpoint), "--arch", "small_cnn", "--input-shape", "1,16,16",
                            "--clean", str(files[1])], 4)):
        out = tmp_path / f"scan-{classes}"
        code, printed = _scan([*argv, "-p", "epochs=1", "--out", str(out)])
        assert code == 0 and printed.startswith("nc scan of ")
        assert json.loads((out / "scan.json").read_text())["classes"] == classes


@pytest.mark.parametrize(("change", "message"), [
    ({"--scanner": "nope"}, "unknown scanner 'nope'; choose from mm-bd, nc"),
    ({"-p": "unlearn_epochs=2"}, "nc has no setting 'unlearn_epochs'"),
    ({"-p": "epochs=many"}, "'many' is not an integer"),
    ({"-p": "epochs=0"}, "nc: epochs, batch sizes and patiences must be positive"),
    ({"-p": "epochs"}, "is not of the form key=value"),
    ({"model": "absent.safetensors"}, "absent.safetensors: no such file"),
    ({"--clean": "odd.npz"}, "odd.npz: images are 1×28×28 (C×H×W) but the model (small_cnn) "
                             "takes 1×16×16"),
    ({"--clean": "labels.npz"}, "labels.npz: labels must lie in [0, 3], found 0..7"),
    ({"--clean": "absent.npz"}, "absent.npz"),
    ({"--clean": None, "--scanner": "nc"}, "nc needs clean data: give --clean"),
    ({"model": "one.h5"}, "a classifier needs 2 to 100,000 classes (an integer), got 1"),
    ({"--out": "blocker"}, "cannot write blocker: it is a file, not a folder"),
    ({"--out": "blocker/scan"}, "cannot write blocker/scan: blocker is not a folder"),
])
def test_bad_input_is_one_line_and_leaves_no_folder(files, tmp_path, monkeypatch, change,
                                                     message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    _npz(tmp_path / "odd.npz", np.zeros((4, 1, 28, 28), np.uint8), np.zeros(4, np.int64))
    _npz(tmp_path / "labels.npz", np.zeros((4, 1, 16, 16), np.uint8), np.array([0, 1, 2, 7]))
    config, weights = small_functional()
    config["config"]["layers"][-1]["config"]["units"] = 1  # a model with one output
    weights["out"] = {"kernel": weights["out"]["kernel"][:, :1], "bias": weights["out"]["bias"][:1]}
    write_keras2(tmp_path / "one.h5", config, weights)
    before = sorted(p.name for p in tmp_path.iterdir())
    options = {"model": str(files[0]), "--clean": str(files[1]), "--out": "scan", **change}
    argv = [options.pop("model")]
    for key, value in options.items():
        argv += [key, value] if value is not None else []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, printed = _scan(argv)
    assert code == 2 and printed == ""
    assert err.getvalue().startswith("goodnet: error: ") and message in err.getvalue(), \
        err.getvalue()
    assert err.getvalue().count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no leftovers


def test_list_and_help_name_every_scanner(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "scanners (goodnet scan):" in listed
    for name, cls in SCANNERS.items():
        line = next(line for line in listed.splitlines() if line.split()[:1] == [name])
        assert cls.paper in line
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    helped = capsys.readouterr().out
    for name, cls in SCANNERS.items():
        line = next((line for line in helped.splitlines() if line.split()[:1] == [name]), "")
        assert cls.__doc__.splitlines()[0] in line, f"{name} has no line of its own"


def test_without_clean_data_the_scan_is_data_free(files, tmp_path):
    """No --clean: the default scanner is MM-BD, which reads no data; it flags the planted
    network's target and pictures its maximum-margin input."""
    model_file, _ = files
    out = tmp_path / "free"
    code, printed = _scan([str(model_file), "-p", "starts=8", "-p", "max_steps=100",
                           "--out", str(out)])
    assert code == 0
    lines = printed.splitlines()
    assert lines[0].startswith(f"mm-bd scan of {model_file}: 4 classes, no data, ")
    summary = json.loads((out / "scan.json").read_text())
    assert summary["scanner"] == "mm-bd" and summary["clean_images"] == 0
    assert summary["verdict"]["targets"] == [1] and "suspected target class: 1" in lines
    picture = np.asarray(Image.open(out / "class-1.png"))
    assert picture.ndim == 3 and picture.shape[0] > 50
