"""MM-BD, the data-free maximum-margin scan: a planted backdoor is flagged with its target and a
clean network of the same kind is not; the scan is seeded, data-free, leaves the model alone,
works without BatchNorm and refuses bad settings; the Gamma null fit and the p-value are checked
against known distributions and formulas worked out by hand."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from goodnet.errors import GoodnetError
from goodnet.scans import make_scanner
from goodnet.scans.mm_bd import MMBD, Gamma, MMBDConfig, _shape_mle, fit_gamma, max_test
from tests.conftest import Planted, halves

FAST = MMBDConfig(**MMBD.quick)


@pytest.fixture(scope="module")
def planted_scan(backdoored):
    model, _, _, _ = backdoored
    return MMBD(FAST).scan(model)


def _margins(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Each class's margin on its image, in eval mode (on a copy: the fixtures are shared)."""
    with torch.no_grad():
        logits = copy.deepcopy(model).eval()(images)
    own = torch.eye(logits.shape[1], dtype=torch.bool)
    return logits[own] - logits.masked_fill(own, -math.inf).amax(1)


def _gamma_loglik(x: np.ndarray, g: Gamma) -> float:
    y = torch.as_tensor((x - g.loc) / g.scale, dtype=torch.float64)
    density = torch.xlogy(torch.tensor(g.shape - 1, dtype=torch.float64), y) - y
    return float(density.sum()) - len(x) * (math.lgamma(g.shape) + math.log(g.scale))


def test_the_planted_target_is_flagged(backdoored, planted_scan):
    model, _, _, attack = backdoored
    report = planted_scan
    verdict = report.verdict
    assert attack.target(torch.tensor([0, 2, 3])).tolist() == [1, 1, 1]
    assert verdict.backdoored and verdict.targets == (1,) and verdict.triggers == ()
    assert report.score_name == "-log10 p" and verdict.threshold == pytest.approx(-math.log10(0.05))
    assert verdict.score == pytest.approx(-math.log10(report.notes["p_value"]))
    assert verdict.score > verdict.threshold
    assert len(verdict.scores) == 4 and max(verdict.scores) == verdict.scores[1]
    assert list(verdict.scores) == report.notes["margins"]
    gamma = report.notes["gamma"]
    assert gamma["shape"] >= 1 and gamma["loc"] <= min(verdict.scores) and gamma["scale"] > 0
    assert report.notes["steps_run"] == [FAST.max_steps] * 4 and report.clean_images == 0
    images = torch.stack(report.images)
    assert images.shape == (4, 1, 16, 16) and images.device.type == "cpu"
    assert 0 <= images.min() <= images.max() <= 1
    # each image is the input that reached its class's margin
    assert _margins(model, images).tolist() == pytest.approx(list(verdict.scores), rel=1e-4)


def test_a_clean_network_is_not_flagged(clean_cnn):
    report = MMBD(FAST).scan(clean_cnn)
    assert not report.backdoored and report.targets == ()
    assert report.notes["p_value"] > 0.05 and report.verdict.score < report.verdict.threshold


def test_the_same_seed_gives_the_same_scan_and_another_seed_other_starts(backdoored,
                                                                        planted_scan):
    model, _, _, _ = backdoored
    again = MMBD(FAST).scan(model)
    assert again.verdict == planted_scan.verdict and again.notes == planted_scan.notes
    assert all(torch.equal(a, b) for a, b in zip(again.images, planted_scan.images, strict=True))
    other = MMBD(dataclasses.replace(FAST, seed=1)).scan(model)
    assert other.notes["margins"] != planted_scan.notes["margins"]


def test_chunking_does_not_change_the_margins(backdoored, planted_scan):
    model, _, _, _ = backdoored
    # 3 images per pass: each class's 5 starts in two passes, one class at a time
    chunked = MMBD(MMBDConfig(starts=5, max_steps=30, images_per_pass=3)).scan(model)
    assert chunked.notes["margins"] == pytest.approx(planted_scan.notes["margins"], rel=1e-4)
    assert chunked.targets == planted_scan.targets


def test_the_scan_leaves_the_model_alone(backdoored):
    model = copy.deepcopy(backdoored[0]).train()
    before = copy.deepcopy(model.state_dict())
    grads = [p.requires_grad for p in model.parameters()]
    MMBD(MMBDConfig(starts=2, max_steps=3)).scan(model)
    assert model.training and [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_contiguous() for p in model.parameters())


def test_data_free_and_given_data_is_ignored(backdoored, planted_scan):
    model, _, _, _ = backdoored
    # clean data that does not even fit the model (8x8, 2 classes) is not looked at
    with_data = make_scanner("mm-bd", {"starts": 5, "max_steps": 30}).scan(model, halves(20))
    assert with_data.clean_images == 0 and with_data.notes == planted_scan.notes


def test_a_network_without_batchnorm_works():
    model = Planted()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(GoodnetError, match="input shape"):
        MMBD(FAST).scan(model)
    model.input_shape = (1, 8, 8)
    report = MMBD(FAST).scan(model)
    images = torch.stack(report.images)
    assert images.shape == (2, 1, 8, 8)
    assert _margins(model, images).tolist() == pytest.approx(report.notes["margins"], rel=1e-4)
    # two classes leave one null value: the test is undetermined, not a detection
    assert report.notes["p_value"] == 1 and report.notes["gamma"] is None
    assert not report.backdoored and report.verdict.score == 0


def test_early_stopping_follows_the_relative_loss_change(backdoored):
    model, _, _, _ = backdoored
    never = MMBD(MMBDConfig(starts=2, max_steps=5, tolerance=0)).scan(model)
    assert never.notes["steps_run"] == [5] * 4
    # the first loss is compared with 1000 (the reference's), so a tolerance of 1 stops each
    # class at its first or second step
    at_once = MMBD(MMBDConfig(starts=2, max_steps=5, tolerance=1.0)).scan(model)
    assert max(at_once.notes["steps_run"]) <= 2


@pytest.mark.parametrize("settings", [
    {"starts": 0}, {"max_steps": 0}, {"images_per_pass": 0}, {"trigger_lr": 0.0},
    {"trigger_lr": math.nan},
    {"tolerance": -1.0}, {"p_threshold": 0.0}, {"p_threshold": 1.0}, {"p_threshold": math.nan},
])
def test_bad_settings_are_refused(settings):
    with pytest.raises(GoodnetError, match=r"^mm-bd: "):
        make_scanner("mm-bd", settings)


def test_settings_of_the_wrong_name_or_type_are_refused():
    with pytest.raises(GoodnetError):
        make_scanner("mm-bd", {"restarts": 5})
    with pytest.raises(GoodnetError):
        make_scanner("mm-bd", {"starts": "many"})


@pytest.mark.parametrize(("shape", "loc", "scale"), [(4.0, 2.0, 1.5), (2.0, -30.0, 10.0)])
def test_the_gamma_fit_recovers_known_parameters(shape, loc, scale):
    sample = np.random.default_rng(0).gamma(shape, scale, 4000) + loc
    fit = fit_gamma(sample.tolist())
    assert fit.shape == pytest.approx(shape, rel=0.15)
    assert fit.scale == pytest.approx(scale, rel=0.15)
    assert fit.loc == pytest.approx(loc, abs=0.2 * scale)
    assert fit.loc < sample.min()
    # a maximum of the likelihood: above the truth's and the neighbours'
    best = _gamma_loglik(sample, fit)
    assert best >= _gamma_loglik(sample, Gamma(shape, loc, scale))
    for nudge in (0.99, 1.01):
        assert best >= _gamma_loglik(sample, Gamma(fit.shape * nudge, fit.loc, fit.scale))
        assert best >= _gamma_loglik(sample, Gamma(fit.shape, fit.loc, fit.scale * nudge))
        nearer = fit.loc + (1 - nudge) * (sample.min() - fit.loc)
        assert best >= _gamma_loglik(sample, Gamma(fit.shape, nearer, fit.scale))


def test_a_small_null_fits_with_shape_at_least_one():
    # nine values shaped like an exponential sample: the free-location likelihood grows without
    # bound as the shape falls below 1, so the fit keeps the shape at 1 or more, and is at least
    # as likely as the shape-1 candidate (a shifted exponential at the minimum)
    values = np.array([0.0, 0.1, 0.25, 0.4, 0.6, 0.9, 1.3, 2.0, 3.5]) + 7
    fit = fit_gamma(values.tolist())
    assert fit.shape >= 1 and fit.loc <= values.min() and fit.scale > 0
    exponential = Gamma(1.0, float(values.min()), float(values.mean() - values.min()))
    assert _gamma_loglik(values, fit) >= _gamma_loglik(values, exponential) - 1e-9


def test_the_shape_equation_is_solved():
    s = torch.logspace(-8, 1, 50, dtype=torch.float64)
    k = _shape_mle(s)
    residual = torch.log(k) - torch.digamma(k) - s
    assert (residual.abs() <= 1e-14 + 1e-12 * s).all()


def test_the_survival_function_is_exact_far_in_the_tail():
    # Q(3, z) = exp(-z) (1 + z + z²/2): the tail is exact even where it underflows a double
    for z in (5.0, 50.0, 800.0):
        assert Gamma(3.0, 0.0, 1.0).log_sf(z) == pytest.approx(-z + math.log1p(z + z * z / 2),
                                                               rel=1e-12)
    assert Gamma(3.0, 1.0, 2.0).log_sf(1.0 + 2 * 800.0) == Gamma(3.0, 0.0, 1.0).log_sf(800.0)
    assert Gamma(3.0, 0.0, 1.0).cdf(-1.0) == 0


def test_the_p_value_falls_with_the_largest_statistic_and_stays_positive():
    null = [1.0, 1.4, 1.9, 2.2, 2.4, 3.1, 3.3, 4.0, 5.2]
    tops = [5.3, 6.0, 8.0, 12.0, 20.0, 50.0, 200.0, 5000.0]
    tests = [max_test([*null, top]) for top in tops]
    log_ps = [t.log_p for t in tests]
    assert all(a > b for a, b in itertools.pairwise(log_ps))
    assert all(math.isfinite(lp) and lp <= 0 for lp in log_ps)
    assert tests[0].p > 0.05 and tests[-1].p < 1e-12
    # the reference's formula, exponent K = all ten statistics, where a double can hold it
    for top, t in zip(tops[:4], tests[:4], strict=True):
        assert t.gamma == fit_gamma(null)
        assert t.p == pytest.approx(1 - t.gamma.cdf(top) ** 10, rel=1e-9)
    # the order of the statistics does not matter
    assert max_test([*null[::-1], 8.0]).log_p == pytest.approx(log_ps[2])
    assert max_test([8.0, *null]).log_p == pytest.approx(log_ps[2])


@pytest.mark.parametrize("stats", [[1.0, 2.0, 9.0], [2.0, 2.0, 2.0, 2.0, 9.0], [5.0] * 10])
def test_an_undetermined_test_is_not_a_detection(stats):
    test = max_test(stats)
    assert test.p == 1 and test.gamma is None


@pytest.mark.parametrize("values", [[1.0, 2.0], [3.0, 3.0, 3.0]])
def test_a_gamma_fit_refuses_too_little_spread(values):
    with pytest.raises(GoodnetError, match="Gamma fit"):
        fit_gamma(values)
