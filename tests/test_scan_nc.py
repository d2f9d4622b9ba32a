"""Neural Cleanse as a scanner: the planted target is flagged with a trigger on the true patch,
the verdict is the ``nc`` repair's own, the same seed gives the same verdict, the model is left
alone, networks without BatchNorm work, and bad input is refused in one clear line."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from goodnet.data import split_clean
from goodnet.defenses.nc import NCConfig, NeuralCleanse
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.models import ModelSpec, build_model
from goodnet.scans import SCANNERS, make_scanner, scan
from goodnet.scans.nc import NCScanConfig, NCScanner
from goodnet.train import TrainConfig, train
from tests.conftest import Planted, halves, stripes
from tests.test_nc import NO_BATCHNORM


@pytest.fixture(scope="module")
def scanned(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    return NCScanner().scan(model, clean), before


def test_the_planted_target_is_flagged_and_its_trigger_is_the_patch(backdoored, scanned):
    _, clean, _, attack = backdoored
    report, _ = scanned
    verdict = report.verdict
    assert report.backdoored and report.targets == verdict.targets == (1,)
    assert verdict.score == max(verdict.scores) == verdict.scores[1] > verdict.threshold == 2.0
    assert sorted(verdict.scores)[-2] <= 2.0
    assert report.score_name == "anomaly index" and report.scanner == "nc"
    assert report.classes == 4 and report.clean_images == len(clean) and report.seconds > 0
    assert report.settings == dataclasses.asdict(NCScanConfig()) and report.images == ()
    assert [t.target for t in verdict.triggers] == [0, 1, 2, 3]
    assert report.notes == {"norms": [t.norm for t in verdict.triggers],
                            "success": [t.success for t in verdict.triggers]}
    trigger = verdict.triggers[1]
    assert trigger.norm == min(report.notes["norms"]) and trigger.success >= 0.95
    rows, cols = attack.trigger.region(16, 16)
    patch = torch.zeros(16, 16, dtype=torch.bool)
    patch[rows, cols] = True
    mask = trigger.mask[0]
    assert (mask[patch] >= 0.5).sum() >= 2  # the reversed mask covers part of the true patch,
    assert mask[patch].mean() >= 5 * mask[~patch].mean()  # far more densely than elsewhere,
    assert trigger.pattern[0][patch & (mask >= 0.5)].min() >= 0.8  # and paints it white


def test_the_scan_is_the_nc_repairs_verdict(backdoored, scanned):
    """The scanner and the repair call the same reverse engineering: the same verdict, bit for
    bit, from the same settings."""
    model, clean, _, _ = backdoored
    report, _ = scanned
    repaired = NeuralCleanse(NCConfig(unlearn_epochs=1)).repair(model, clean).scan
    assert repaired is not None
    _assert_same_verdict(report.verdict, repaired)


def test_the_same_seed_gives_the_same_verdict_and_another_seed_another_start():
    clean = halves(64)
    first, again, other = (NCScanner(NCScanConfig(epochs=2, seed=seed)).scan(Planted(), clean)
                           for seed in (0, 0, 1))
    _assert_same_verdict(first.verdict, again.verdict)
    assert not torch.equal(first.verdict.triggers[0].mask, other.verdict.triggers[0].mask)


def test_the_callers_model_is_untouched(backdoored, scanned):
    model, _, _, _ = backdoored
    _, before = scanned
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mine = Planted().train()
    weights = copy.deepcopy(mine.state_dict())
    NCScanner(NCScanConfig(epochs=1)).scan(mine, halves(32))
    assert mine.training and all(p.requires_grad for p in mine.parameters())
    assert all(torch.equal(weights[k], v) for k, v in mine.state_dict().items())


def test_a_network_without_batchnorm_is_flagged_with_its_target():
    """The Keras-style graph of test_nc (convolution, pooling, dense; no BatchNorm) trained with
    the stripes BadNets backdoor (target 1)."""
    from goodnet.attacks import make_attack

    train_data, test = stripes(800, seed=0), stripes(200, seed=1)
    attack = make_attack("badnets", {"target": 1, "poison_rate": 0.1}, train_data.image_shape,
                         train_data.num_classes)
    model = build_model(ModelSpec("graph", 4, 1, 16, 16, (0.0,), (1.0,), graph=NO_BATCHNORM))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    train(model, attack.poison(train_data, seed=0), TrainConfig(epochs=3, batch_size=32))
    assert evaluate(model, test, attack).attack_success_rate >= 0.95
    clean, _ = split_clean(train_data, 0.25, seed=0)
    assert scan(model, clean).targets == (1,)  # clean data given: NC is the default scanner


def test_two_classes_can_never_be_flagged():
    """By hand: with two norms the median is their mean and MAD = 1.4826 · half their gap, so
    the indices are ±1/1.4826 whatever the norms, below the threshold of 2 (Neural Cleanse
    needs several classes). The BatchNorm-free planted network is scanned all the same."""
    report = NCScanner(NCScanConfig(epochs=2)).scan(Planted(), halves(64))
    assert sorted(report.verdict.scores) == pytest.approx([-1 / 1.4826, 1 / 1.4826])
    assert not report.backdoored and report.targets == () and len(report.verdict.triggers) == 2


def _assert_same_verdict(first, second) -> None:
    assert (first.backdoored, first.targets, first.score, first.threshold, first.scores) == \
        (second.backdoored, second.targets, second.score, second.threshold, second.scores)
    for a, b in zip(first.triggers, second.triggers, strict=True):
        assert (a.target, a.norm, a.success) == (b.target, b.norm, b.success)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)


def test_a_model_with_one_output_is_refused():
    one = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    with pytest.raises(GoodnetError, match="the model has 1 output; a scan needs at least 2"):
        NCScanner().scan(one, halves(16))


def test_clean_data_that_does_not_fit_the_model_is_refused(backdoored):
    model, _, _, _ = backdoored
    with pytest.raises(GoodnetError, match=r"^the data does not fit the model: ") as error:
        NCScanner().scan(model, halves(16))  # 8×8 images, the model takes 16×16
    assert "\n" not in str(error.value)
    with pytest.raises(GoodnetError, match=r"^stripes\[40\] has 3 classes, the model 4 outputs$"):
        NCScanner().scan(model, stripes(40, num_classes=3))
    with pytest.raises(GoodnetError, match=r"^nc needs clean data$"):
        NCScanner().scan(model)


def test_the_settings_are_the_defenses_detection_settings():
    shared = {f.name: f.default for f in dataclasses.fields(NCScanConfig)}
    defense = {f.name: f.default for f in dataclasses.fields(NCConfig)}
    assert shared == {k: defense[k] for k in shared}
    assert not any(k.startswith("unlearn") for k in shared)
    assert NCConfig(epochs=3, seed=2).detection() == NCScanConfig(epochs=3, seed=2)
    assert SCANNERS["nc"] is NCScanner and make_scanner("nc").config == NCScanConfig()


@pytest.mark.parametrize(("settings", "message"), [
    ({"epochs": 0}, "nc: epochs, batch sizes and patiences must be positive"),
    ({"anomaly_threshold": -1.0}, "nc: anomaly_threshold must be"),
    ({"success_threshold": 1.5}, "nc: success_threshold must be in"),
    ({"unlearn_epochs": 3}, "nc has no setting 'unlearn_epochs'"),
    ({"trigger_lr": math.inf}, "nc: setting trigger_lr must be"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(GoodnetError, match=message.replace("(", r"\(")):
        make_scanner("nc", settings)
