"""Input-level detectors (issue 18): triggered inputs score above clean ones on a backdoored
network, the calibrated threshold gives the requested false-alarm rate on fresh clean data, the
same seed gives the same scores, the caller's model is untouched, and bad settings are refused
in one line."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from goodnet.data import split_clean
from goodnet.detectors import DETECTORS, calibrate, make_detector
from goodnet.errors import GoodnetError
from goodnet.metrics import auroc, poisoned_batches
from tests.conftest import Planted, halves, stripes

# --- calibration -------------------------------------------------------------------------------


def test_the_threshold_is_the_conformal_order_statistic():
    scores = torch.arange(1.0, 100.0)  # 99 scores, 1..99
    assert calibrate(scores, 0.01) == 99.0  # rank ⌈100 · 0.99⌉ = 99
    assert calibrate(scores, 0.05) == 95.0  # rank ⌈100 · 0.95⌉ = 95
    assert calibrate(scores[torch.randperm(99)], 0.05) == 95.0  # order does not matter
    with pytest.raises(GoodnetError, match=re.escape(
            "98 clean images cannot calibrate a false-alarm rate of 0.01: it takes at least 99")):
        calibrate(scores[:98], 0.01)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_a_false_alarm_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(GoodnetError, match="false-alarm rate must lie in"):
        calibrate(torch.rand(500), rate)


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_calibration_keeps_the_rate_on_fresh_scores(rate):
    """Over many draws of 300 calibration scores, the share of fresh scores above the threshold
    averages between rate − 1/(n+1) and rate (the conformal bounds), within sampling error."""
    generator = torch.Generator().manual_seed(0)
    n, draws, fresh = 300, 200, 2000
    rates = []
    for _ in range(draws):
        threshold = calibrate(torch.randn(n, generator=generator), rate)
        rates.append(float((torch.randn(fresh, generator=generator) > threshold).float().mean()))
    mean = sum(rates) / draws
    spread = 3 * math.sqrt(rate * (1 - rate) / fresh / draws) + 0.003
    assert rate - 1 / (n + 1) - spread <= mean <= rate + spread, mean


# --- the detectors on a backdoored network ---------------------------------------------------


@pytest.fixture(scope="module")
def scored(backdoored):
    """Each detector's scores on the clean test images and on their triggered copies (those of
    other classes than the target)."""
    model, clean, test, attack = backdoored
    out = {}
    for name in sorted(DETECTORS):
        detection = make_detector(name, DETECTORS[name].quick).detect(model, clean)
        clean_scores = detection.scores(test)
        triggered = torch.cat([detection(x_poisoned) for _, _, parts in
                               poisoned_batches(test, attack, 64)
                               for _, x_poisoned, _, _ in parts])
        out[name] = (clean_scores, triggered)
    return out


# Not TeCo: on this network the patch holds its class under every corruption at every
# severity, so every triggered input scores 0 (all types "never" flip, the reference's 6), below
# clean inputs, which give way at different severities (see the next test).
@pytest.mark.parametrize("name", ["mahalanobis", "scale-up", "strip"])
def test_triggered_inputs_score_above_clean_ones(scored, name):
    clean_scores, triggered = scored[name]
    assert len(triggered) > 100 and len(clean_scores) == 200
    assert auroc(triggered.tolist(), clean_scores.tolist()) >= 0.8  # chance is 0.5


def test_teco_scores_a_trigger_that_nothing_breaks_as_zero(scored):
    """TeCo's reference scores the spread of the first flipping severities, with 6 for a type
    that never flips: a trigger robust to every corruption scores exactly 0, as here."""
    clean_scores, triggered = scored["teco"]
    assert (triggered == 0).float().mean() >= 0.95 and clean_scores.mean() > 0.5


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_the_same_seed_gives_the_same_scores_and_the_model_is_untouched(backdoored, name):
    model, clean, test, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    model.train()
    assert "quick" in vars(DETECTORS[name])
    first = make_detector(name, DETECTORS[name].quick).detect(model, clean).scores(test)
    second = make_detector(name, DETECTORS[name].quick).detect(model, clean).scores(test)
    assert torch.equal(first, second)
    assert model.training  # the caller's mode is kept
    model.eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_strip_overlays_come_from_the_clean_data_by_seed(backdoored):
    model, clean, test, _ = backdoored
    one = make_detector("strip", {"overlays": 20, "seed": 0}).detect(model, clean)
    other = make_detector("strip", {"overlays": 20, "seed": 1}).detect(model, clean)
    assert one.get_buffer("overlays").shape == (20, *clean.image_shape)
    assert not torch.equal(one.scores(test), other.scores(test))
    everything = make_detector("strip", {"overlays": 10_000}).detect(model, clean)
    assert len(everything.get_buffer("overlays")) == len(clean)


def test_a_calibrated_detector_keeps_the_requested_rate_on_fresh_clean_images(backdoored):
    """Calibrated on 300 clean images held out from the overlays, STRIP's false-alarm rate on
    1000 fresh clean images is the requested 5 % within its sampling error."""
    model, _, _, _ = backdoored
    data = stripes(1600, seed=7)
    pool, rest = split_clean(data, 300, seed=0)
    calibration, fresh = split_clean(rest, 300, seed=1)
    detection = make_detector("strip", {"overlays": 30}).detect(model, pool)
    threshold = calibrate(detection.scores(calibration), 0.05)
    measured = float((detection.scores(fresh) > threshold).float().mean())
    assert abs(measured - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / len(fresh)) + 1 / 301


def test_the_planted_trigger_stands_out_under_every_detector():
    """On the planted network the lit corner sends every blend and every scaled copy of a
    class-1 image to class 0 with near certainty, and gives way to contrast and blur long before
    it gives way to noise, and its features (the third channel lit) are nothing a clean class-0
    image has: STRIP's, soft SCALE-UP's, TeCo's and Mahalanobis's scores of triggered inputs
    exceed every clean input's."""
    data = halves(100)
    x, y = data.get(torch.arange(100))
    triggered = x[y == 1].clone()  # the inputs whose class the trigger changes
    triggered[:, :, 6:8, 6:8] = 1.0
    for name, settings in (("strip", {}), ("scale-up", {"soft": True}), ("teco", {}),
                           ("mahalanobis", {})):
        detection = make_detector(name, settings).detect(Planted(), data)
        assert detection(triggered).min() > detection(x).max(), name


def test_scale_up_needs_no_data_and_takes_a_handful_of_values(backdoored):
    model, _, test, _ = backdoored
    detection = make_detector("scale-up").detect(model)
    values = {round(v, 5) for v in detection.scores(test).tolist()}
    assert values <= {k / 5 for k in range(6)} and len(values) >= 2


@pytest.mark.parametrize(("name", "settings", "message"), [
    ("strip", {"overlays": 0}, "overlays must be positive"),
    ("strip", {"weight": 0.0}, "weight must lie in"),
    ("scale-up", {"scales": [0.5, 3]}, "factors above 1"),
    ("scale-up", {"scales": []}, "factors above 1"),
    ("teco", {"corruptions": ["fog"]}, "two or more distinct"),
    ("teco", {"corruptions": ["contrast", "contrast"]}, "two or more distinct"),
    ("strip", {"no_such": 1}, "has no setting 'no_such'"),
    ("mahalanobis", {"layer": ""}, "layer must be"),
])
def test_bad_settings_are_refused(name, settings, message):
    with pytest.raises(GoodnetError, match=message):
        make_detector(name, settings)


def test_an_unknown_detector_and_missing_clean_data_are_refused():
    with pytest.raises(GoodnetError, match="unknown detector 'frost'; choose from"):
        make_detector("frost")
    with pytest.raises(GoodnetError, match="strip needs clean data"):
        make_detector("strip").detect(Planted())


# --- Mahalanobis -------------------------------------------------------------------------------


def test_mahalanobis_scores_the_distance_to_the_predicted_class_mean(backdoored):
    """The score is (f − μ_c)ᵀ Σ⁻¹ (f − μ_c) at the last linear layer's input, with μ_c the clean
    mean of the predicted class and Σ the shrunk pooled within-class covariance, recomputed here
    from the clean features with NumPy."""
    import numpy as np

    from goodnet.detectors.mahalanobis import ledoit_wolf

    model, clean, test, _ = backdoored
    detection = make_detector("mahalanobis").detect(model, clean)
    layer = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured = []
    handle = layer.register_forward_hook(lambda _m, i, _o: captured.append(i[0].flatten(1)))
    model.eval()
    x_clean, y_clean = clean.get(torch.arange(len(clean)))
    x_test, _ = test.get(torch.arange(50))
    with torch.no_grad():
        model(x_clean)
        predicted = model(x_test).argmax(1).numpy()
    handle.remove()
    features = captured[0].double().numpy()
    labels = y_clean.numpy()
    means = np.stack([features[labels == c].mean(0) for c in range(layer.out_features)])
    covariance = ledoit_wolf(torch.from_numpy(features - means[labels])).numpy()
    d = captured[1].double().numpy() - means[predicted]
    expected = np.einsum("ij,jk,ik->i", d, np.linalg.pinv(covariance), d)
    got = detection(x_test).double().numpy()
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_ledoit_wolf_is_sklearns_estimate():
    """The shrunk covariance against scikit-learn's ``ledoit_wolf`` (``assume_centered=True``)
    written out here in NumPy from its source: block sums of X²ᵀX² and (XᵀX)²."""
    import numpy as np

    from goodnet.detectors.mahalanobis import ledoit_wolf

    rng = np.random.default_rng(0)
    for n, p in ((20, 50), (300, 40), (1000, 5)):
        x = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) * 0.3
        x2 = x**2
        trace = x2.sum(0) / n
        mu = trace.sum() / p
        beta_ = (x2.T @ x2).sum()
        delta_ = ((x.T @ x) ** 2).sum() / n**2
        beta = min(1.0 / (p * n) * (beta_ / n - delta_),
                   (delta_ - 2.0 * mu * trace.sum() + p * mu**2) / p)
        delta = (delta_ - 2.0 * mu * trace.sum() + p * mu**2) / p
        shrinkage = 0.0 if beta == 0 else beta / delta
        expected = (1 - shrinkage) * (x.T @ x / n) + shrinkage * mu * np.eye(p)
        got = ledoit_wolf(torch.from_numpy(x)).numpy()
        assert np.allclose(got, expected, rtol=1e-9, atol=1e-12), (n, p)


def test_ledoit_wolf_shrinks_when_data_are_few_and_not_when_they_are_many():
    from goodnet.detectors.mahalanobis import ledoit_wolf

    generator = torch.Generator().manual_seed(0)
    few = torch.randn(20, 50, generator=generator)  # isotropic, fewer rows than columns
    shrunk = ledoit_wolf(few - few.mean(0))
    assert torch.linalg.eigvalsh(shrunk).min() > 0  # invertible though the sample one is not
    off = shrunk - torch.diag(torch.diagonal(shrunk))
    sample = (few - few.mean(0)).double().T @ (few - few.mean(0)).double() / 20
    assert off.abs().mean() < 0.2 * (sample - torch.diag(torch.diagonal(sample))).abs().mean()
    scale = torch.tensor([5.0, 1.0, 0.2])
    many = torch.randn(20000, 3, generator=generator) * scale
    estimate = ledoit_wolf(many - many.mean(0))
    assert torch.allclose(torch.diagonal(estimate).float(), scale**2, rtol=0.05)


def test_mahalanobis_refuses_a_model_without_classifier_and_a_layer_that_is_not_one():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    with pytest.raises(GoodnetError, match="no fully connected layer produces the model's"):
        make_detector("mahalanobis").detect(model, halves(20))
    with pytest.raises(GoodnetError, match="'0' is not a fully connected layer"):
        make_detector("mahalanobis", {"layer": "0"}).detect(model, halves(20))
