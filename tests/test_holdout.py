"""The defender's images held out of training, and detectors calibrated with a stated confidence
(issue 27): a model goodnet trains never sees the clean images ``--clean`` later draws, its card
says which they are, a copy that differs or a card that says nothing is reported, and a threshold
calibrated with confidence ``c`` lets the false-alarm rate on fresh inputs exceed the one asked
for on at most ``1 − c`` of calibration sets."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from fractions import Fraction

import pytest
import torch

from goodnet import backdoor
from goodnet.artifacts import load_model, save_model
from goodnet.attacks import ATTACKS
from goodnet.bench import parse_grid
from goodnet.bench.cell import check_model
from goodnet.cli import main
from goodnet.data.dataset import ImageData
from goodnet.data.holdout import HoldOut, defender_clean, digest, split_held_out
from goodnet.detectors import calibrate
from goodnet.detectors.base import calibration_needed, conformal_rank
from goodnet.errors import GoodnetError
from goodnet.train import TrainConfig
from tests.conftest import stripes
from tests.test_bench import tiny

# --- calibration with a confidence -------------------------------------------------------------


def _tail(n: int, k: int, rate: Fraction) -> Fraction:
    """P(Binomial(n, 1 − rate) ≥ k), exactly."""
    keep = 1 - rate
    return sum((math.comb(n, j) * keep**j * rate ** (n - j) for j in range(k, n + 1)),
               Fraction(0))


@pytest.mark.parametrize(("n", "rate", "confidence"), [
    (30, "1/10", "9/10"), (60, "1/20", "19/20"), (299, "1/100", "19/20"),
    (300, "1/100", "9/10"), (500, "1/50", "19/20"), (298, "1/100", "19/20")])
def test_the_confident_rank_is_the_smallest_with_the_binomial_tail_in_bounds(n, rate,
                                                                              confidence):
    """The threshold's rank k is the smallest with P(Binomial(n, 1 − α) ≥ k) ≤ 1 − c, worked
    out here in exact fractions; n + 1 where not even the largest score will do."""
    alpha, c = Fraction(rate), Fraction(confidence)
    k = conformal_rank(n, float(alpha), float(c))
    if k <= n:
        assert _tail(n, k, alpha) <= 1 - c
        assert k == 1 or _tail(n, k - 1, alpha) > 1 - c
    else:
        assert k == n + 1 and _tail(n, n, alpha) > 1 - c
    assert (k <= n) == (n >= calibration_needed(float(alpha), float(c)))


def test_the_images_a_confident_calibration_needs():
    # (1 − α)^n ≤ 1 − c: n ≥ ln 0.05 / ln 0.99 = 298.07
    assert calibration_needed(0.01, 0.95) == 299
    assert calibration_needed(0.01) == 99  # the average rule: n ≥ 1/α − 1
    scores = torch.arange(1.0, 300.0)  # 299 scores: only the largest keeps 1 % at 95 %
    assert calibrate(scores, 0.01, 0.95) == 299.0
    assert calibrate(scores, 0.01) == 297.0  # rank ⌈300 · 0.99⌉
    with pytest.raises(GoodnetError, match=re.escape(
            "298 clean images cannot calibrate a false-alarm rate of 0.01 at 95 % confidence: "
            "it takes at least 299")):
        calibrate(scores[:298], 0.01, 0.95)
    with pytest.raises(GoodnetError, match="confidence must lie in"):
        calibrate(scores, 0.01, 1.0)


@pytest.mark.parametrize(("n", "rate", "confidence"), [(299, 0.01, 0.95), (600, 0.01, 0.9),
                                                       (200, 0.05, 0.95)])
def test_with_confidence_the_rate_on_fresh_inputs_rarely_exceeds_the_one_asked(n, rate,
                                                                                confidence):
    """Uniform scores, so the rate a threshold t lets through on fresh inputs is exactly 1 − t.
    Over 2000 calibration sets, the rate exceeds the one asked for on at most 1 − c of them
    (within sampling error) with the confidence, and on far more without it."""
    generator = torch.Generator().manual_seed(0)
    draws = 2000
    over_confident = over_average = 0
    for _ in range(draws):
        scores = torch.rand(n, generator=generator, dtype=torch.float64)
        over_confident += 1 - calibrate(scores, rate, confidence) > rate
        over_average += 1 - calibrate(scores, rate) > rate
    allowed = 1 - confidence
    assert over_confident / draws <= allowed + 3 * math.sqrt(allowed * confidence / draws)
    assert over_average / draws > 0.3


# --- the images held out of training -----------------------------------------------------------


def _unique(n: int) -> ImageData:
    """Stripes whose every image differs (its index written into two pixels)."""
    data = stripes(n, seed=5)
    images = data.images.clone()
    index = torch.arange(n)
    images[:, 0, 15, 0] = (index % 256).to(torch.uint8)
    images[:, 0, 15, 1] = (index // 256).to(torch.uint8)
    return ImageData(images, data.labels, data.num_classes, "unique")


def _rows(data: ImageData) -> set[bytes]:
    return {row.numpy().tobytes() for row in data.images}


def test_a_model_never_trains_on_the_images_the_defender_draws(monkeypatch):
    """What the training loop is given and what ``--clean`` draws are disjoint; the card says
    how many were held out and how to find them again."""
    train, test = _unique(400), stripes(40, seed=6)
    seen = []
    real_train = backdoor.train

    def spy(model, source, config, progress=False):
        seen.append(source)
        return real_train(model, source, config, progress=progress)

    monkeypatch.setattr(backdoor, "train", spy)
    result = backdoor.train_model("small_cnn", train, test,
                                  TrainConfig(epochs=1, batch_size=64, seed=3), hold_out=0.1)
    (source,) = seen
    assert len(source) == 360 and result.card.training["images"] == 360
    held = HoldOut.from_training(result.card.training)
    assert held == HoldOut("unique", 0.1, 3, 40, held.sha256)
    for amount in (0.05, 0.1, 20):
        clean, caveat = defender_clean(train, amount, 0, held)
        assert caveat is None and len(clean) == (20 if amount != 0.1 else 40)
        assert not _rows(clean) & _rows(source)
    with pytest.raises(GoodnetError, match="ask for at most 40"):
        defender_clean(train, 0.2, 0, held)


def test_the_defender_is_told_when_it_cannot_be_known():
    train = _unique(400)
    rest, held = split_held_out(train, 40, seed=1)
    assert held is not None and len(rest) == 360
    clean, caveat = defender_clean(train, 40, 0, None)
    assert caveat == "its card records no held-out images" and len(clean) == 40
    renamed = dataclasses.replace(train, name="other")
    assert defender_clean(renamed, 40, 0, held)[1] == "it held out images of unique, not of other"
    images = train.images.clone()
    images[:, 0, 0, 0] ^= 1  # another copy of the data set: every image differs a little
    copy = ImageData(images, train.labels, train.num_classes, "unique")
    assert digest(copy) != digest(train)
    assert defender_clean(copy, 40, 0, held)[1] == \
        "this copy of unique is not the one it was trained on"
    assert defender_clean(train, 40, 0, held)[1] is None


def test_the_hold_out_survives_the_model_file_and_a_bad_record_is_one_error(tmp_path):
    result = backdoor.train_model("small_cnn", _unique(200), stripes(20, seed=6),
                                  TrainConfig(epochs=1, batch_size=64), hold_out=20)
    path = save_model(tmp_path / "m.safetensors", result.model, result.card)
    card = load_model(path).card
    assert HoldOut.from_training(card.training) == HoldOut.from_training(result.card.training)
    assert HoldOut.from_training({}) is None
    for bad in ({"count": "x"}, {"seed": True}, {"amount": -1}, {"extra": 1}):
        record = {**card.training["held_out"], **bad}
        with pytest.raises(GoodnetError, match="held_out entry is malformed"):
            HoldOut.from_training({"held_out": record})


def test_a_cached_model_that_trained_on_the_held_out_images_is_refused(data_folder, tmp_path):
    (job, *_) = parse_grid(tiny(data_folder, tmp_path)).models()
    record = {"data": "x", "amount": job.hold_out, "seed": job.seed, "count": 40,
              "sha256": "0" * 64}
    check_model(job, {"config": job.train_config_dict(), "held_out": record},
                {"name": "badnets", "config": job.attack.resolved(ATTACKS, "attack")})
    with pytest.raises(GoodnetError, match="trained on the images now held out for the defender"):
        check_model(job, {"config": job.train_config_dict()},
                    {"name": "badnets", "config": job.attack.resolved(ATTACKS, "attack")})
    with pytest.raises(GoodnetError, match="other training, attack or hold-out settings"):
        check_model(job, {"config": job.train_config_dict(),
                          "held_out": {**record, "seed": job.seed + 1}},
                    {"name": "badnets", "config": job.attack.resolved(ATTACKS, "attack")})


def test_a_grid_draws_no_more_clean_images_than_its_models_hold_out(data_folder, tmp_path):
    with pytest.raises(GoodnetError, match=r"clean 0\.1 is more than hold_out 0\.05"):
        parse_grid(tiny(data_folder, tmp_path, clean=0.1, hold_out=0.05))
    base = parse_grid(tiny(data_folder, tmp_path))
    other = parse_grid(tiny(data_folder, tmp_path, hold_out=80))
    assert {c.key for c in base.cells()}.isdisjoint(c.key for c in other.cells())


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("hold_out", ["200", "0"])
def test_repair_calibrates_on_held_out_images_or_says_it_cannot(npz_pair, tmp_path, capsys,
                                                                hold_out):
    train, test = npz_pair
    model = tmp_path / "m.safetensors"
    assert main(["--no-progress", "attack", "--data", str(train), "--test", str(test),
                 "-p", "target=1", "--epochs", "1", "--batch-size", "64", "--hold-out",
                 hold_out, "--out", str(model)]) == 0
    printed = capsys.readouterr().out
    assert ("held out 200 of the 800 training images" in printed) == (hold_out == "200")
    out = tmp_path / "r"
    assert main(["--no-progress", "repair", str(model), "--defense", "prune", "--clean",
                 str(train), "--clean-amount", "200", "--test", str(test), "--detect",
                 "mahalanobis", "--false-alarm", "0.05", "--curve-limit", "0",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    screen = json.loads((out / "repair.json").read_text())["goodnet_checks"]["screens"][0]
    assert screen["confidence"] == 0.95 and screen["calibration_images"] == 59
    if hold_out == "200":  # the images the model held out, and nothing to warn of
        assert "200 clean images (train.npz:held-out[200])" in captured.out
        assert captured.err == ""
    else:  # the whole file, which the model trained on: one line says so
        assert "800 clean images (train.npz)" in captured.out
        assert captured.err.count("\n") == 1
        assert "may have trained on the clean images (its card records no held-out images)" \
            in captured.err


@pytest.mark.parametrize("value", ["-0.1", "1.5", "x"])
def test_a_bad_hold_out_is_one_line(npz_pair, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["attack", "--data", str(npz_pair[0]), "--test", str(npz_pair[1]),
              "--hold-out", value, "--out", str(tmp_path / "m.safetensors")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--hold-out takes 0, a fraction in (0, 1) or a count" in err and \
        err.count("\n") == 1
