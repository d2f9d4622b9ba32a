"""K-Arm's pre-selection of candidate classes for Neural Cleanse on many classes (issue 29,
item 6): a planted target among 120 classes is kept among the candidates and flagged, the scan
carries a trigger per class with the warm-up ones marked, the repairs unlearn the fully
reversed ones, a model of at most 100 classes is scanned exactly as before, the stored keys do
not change, and bad settings are refused.

The network is built by hand so that the right answer can be worked out on paper: each class
is a random binary prototype image (a 3×3 corner always dark), the logits are the image's dot
products with the centred prototypes, and the target's row also weighs the corner by 5 per
pixel. A white corner adds 45 to the target's logit, more than any clean margin; a clean
class's trigger must repaint about half of the other 91 pixels.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from goodnet.bench.grid import resolved
from goodnet.data.dataset import ImageData
from goodnet.defenses.nc import NCConfig, NeuralCleanse
from goodnet.defenses.unlearn import Unlearn, UnlearnConfig
from goodnet.errors import GoodnetError
from goodnet.scans import make_scanner
from goodnet.scans.karm import select_arms
from goodnet.scans.nc import NCScanConfig, detect, reverse_engineer, scan_data
from goodnet.settings import build_settings
from goodnet.triggers import load_triggers, save_triggers

SIZE = 10
CORNER = slice(7, 10)
CLASSES = 120
PRESELECTION = ("candidates", "preselect_above", "warmup_steps", "bandit_steps",
                "bandit_epsilon", "reference_classes", "preselect_images")


def prototypes(classes: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    protos = torch.where(torch.rand(classes, 1, SIZE, SIZE, generator=generator) < 0.5, 0.1, 0.9)
    protos[:, :, CORNER, CORNER] = 0.0
    return protos


def noisy(protos: torch.Tensor, per_class: int, seed: int) -> ImageData:
    """``per_class`` noisy copies of each prototype, the corner dark."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(protos)).repeat(per_class)
    images = protos[labels] + (torch.rand(len(labels), 1, SIZE, SIZE, generator=generator)
                               - 0.5) * 0.2
    images[:, :, CORNER, CORNER] = 0.0
    return ImageData(images.clamp(0, 1), labels, len(protos), f"prototypes[{len(labels)}]")


def planted(protos: torch.Tensor, target: int) -> nn.Module:
    fc = nn.Linear(SIZE * SIZE, len(protos))
    with torch.no_grad():
        fc.weight.copy_((protos - 0.5).flatten(1))
        fc.bias.zero_()
        fc.weight.view(-1, SIZE, SIZE)[target, CORNER, CORNER] += 5.0
    return nn.Sequential(nn.Flatten(), fc).eval()


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module", params=[37, 111])
def many(request):
    """A planted network of 120 classes with target ``request.param``, its clean data (5 images
    a class: more than the 512 the pre-selection uses) and the scan's verdict."""
    protos = prototypes(CLASSES)
    model = frozen(planted(protos, request.param))
    clean = noisy(protos, 5, seed=1)
    return request.param, model, clean, detect(model, clean, NCScanConfig())


def test_the_planted_network_is_what_the_docstring_says(many):
    target, model, clean, _ = many
    stamped = clean.images.clone()
    stamped[:, :, CORNER, CORNER] = 1.0
    with torch.no_grad():
        assert (model(clean.images).argmax(1) == clean.labels).all()
        assert (model(stamped).argmax(1) == target).all()


def test_the_arm_selection_keeps_the_planted_target_among_its_candidates(many):
    target, model, clean, _ = many
    cfg = NCScanConfig()
    arms = select_arms(model, scan_data(clean, cfg), cfg)
    assert target in arms.ranked[:cfg.candidates]
    assert sorted(arms.ranked) == list(range(CLASSES))
    assert int(arms.steps.min()) == cfg.warmup_steps  # every arm warmed up
    assert int(arms.steps.sum()) == CLASSES * cfg.warmup_steps + cfg.bandit_steps
    assert int(arms.steps[target]) > 3 * cfg.warmup_steps  # the bandit kept stepping it


def test_the_scan_flags_the_planted_target_with_the_corner_as_its_trigger(many):
    target, _, _, verdict = many
    full = verdict.fully_reversed
    assert len(full) == 20 and target in full and verdict.backdoored and target in verdict.targets
    assert verdict.score == verdict.scores[target] > 5 and set(verdict.targets) <= set(full)
    trigger = verdict.triggers[target]
    assert trigger.success >= 0.99 and trigger.norm < 10
    corner = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    corner[CORNER, CORNER] = True
    mask = trigger.mask[0]
    assert mask[corner].sum() >= 0.5 * trigger.norm  # the mask sits on the corner,
    assert mask[corner].mean() >= 10 * mask[~corner].mean()  # far more densely than elsewhere
    # A trigger per class, in class order; the warm-up ones marked (no index, no success).
    assert [t.target for t in verdict.triggers] == list(range(CLASSES))
    for k in range(CLASSES):
        fully = k in full
        assert math.isnan(verdict.scores[k]) != fully
        assert math.isnan(verdict.triggers[k].success) != fully


def test_the_anomaly_index_takes_its_median_from_the_reference_classes_alone(many):
    target, model, clean, verdict = many
    cfg = NCScanConfig()
    arms = select_arms(model, scan_data(clean, cfg), cfg)
    candidates = set(arms.ranked[:cfg.candidates])
    reference = [k for k in verdict.fully_reversed if k not in candidates]
    assert len(reference) == cfg.reference_classes and target not in reference
    norms = torch.tensor([verdict.triggers[k].norm for k in reference], dtype=torch.float64)
    median = torch.quantile(norms, 0.5)
    mad = 1.4826 * torch.quantile((norms - median).abs(), 0.5)
    expected = (median - verdict.triggers[target].norm) / mad
    assert verdict.scores[target] == pytest.approx(float(expected), rel=1e-9)


def test_the_same_seed_gives_the_same_verdict(many):
    _, model, clean, verdict = many
    again = detect(model, clean, NCScanConfig())
    assert again.targets == verdict.targets and again.fully_reversed == verdict.fully_reversed
    assert again.scores[verdict.fully_reversed[0]] == verdict.scores[verdict.fully_reversed[0]]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(again.triggers, verdict.triggers,
                                                          strict=True))


def test_a_scan_of_many_classes_saves_and_loads_its_marked_triggers(many, tmp_path):
    _, model, clean, _ = many
    report = make_scanner("nc").scan(model, clean)
    path = save_triggers(tmp_path / "triggers.safetensors", report.verdict)
    loaded = load_triggers(path)
    assert loaded.fully_reversed == report.verdict.fully_reversed
    assert [math.isnan(t.success) for t in loaded.triggers] == \
        [math.isnan(t.success) for t in report.verdict.triggers]


def test_unlearn_unlearns_the_fully_reversed_triggers_and_nc_the_flagged_one(many):
    target, frozen_model, clean, _ = many
    model = copy.deepcopy(frozen_model).requires_grad_(True)
    quick = {"epochs": 2}
    result = Unlearn(UnlearnConfig(scan=NCScanConfig(**quick), unlearn_epochs=1)).repair(
        model, clean)
    full = result.notes["fully_reversed"]
    assert len(full) == 20 and target in full and target in result.scan.targets
    assert result.notes["unlearning_images"] == round(0.2 * len(clean))
    assert len(result.curve.points[-1].extra) == 1  # the watched triggers' success
    nc = NeuralCleanse(NCConfig(**quick, unlearn_epochs=1)).repair(model, clean)
    assert target in nc.notes["flagged"] and nc.scan.fully_reversed == result.scan.fully_reversed
    assert nc.notes["fully_reversed"] == full


def test_at_most_preselect_above_classes_every_class_is_reversed_as_before():
    """100 classes (the default ``preselect_above``): the scan is the one without any
    pre-selection, bit for bit, and reversing a few classes alone gives their triggers."""
    protos = prototypes(100)
    model = frozen(planted(protos, 3))
    clean = noisy(protos, 2, seed=1)
    cfg = NCScanConfig(epochs=1)
    verdict = detect(model, clean, cfg)
    without = detect(model, clean, dataclasses.replace(cfg, candidates=0))
    assert verdict.fully_reversed == () and len(verdict.triggers) == 100
    assert verdict.scores == without.scores and verdict.targets == without.targets
    assert all(torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)
               and a.success == b.success
               for a, b in zip(verdict.triggers, without.triggers, strict=True))
    some = reverse_engineer(model, clean, cfg, classes=[3, 50, 97])
    for trigger in some:
        whole = verdict.triggers[trigger.target]
        torch.testing.assert_close(trigger.mask, whole.mask)
        assert trigger.success == whole.success


def test_the_new_settings_leave_stored_keys_unchanged():
    for config in (NCScanConfig(), NCConfig(), UnlearnConfig()):
        keys = resolved(config)
        keys = keys.get("scan", keys) if isinstance(config, UnlearnConfig) else keys
        assert not set(PRESELECTION) & set(keys)
    # The nested scan settings keep their names (no rename applied inside), as before.
    before = {k: v for k, v in dataclasses.asdict(NCScanConfig()).items()
              if k not in PRESELECTION}
    assert resolved(UnlearnConfig())["scan"] == before
    assert resolved(NCScanConfig(candidates=5))["candidates"] == 5
    assert resolved(UnlearnConfig(scan=NCScanConfig(warmup_steps=3)))["scan"]["warmup_steps"] == 3


@pytest.mark.parametrize("bad", [{"candidates": -1}, {"preselect_above": -1},
                                 {"warmup_steps": 0}, {"bandit_steps": -5},
                                 {"bandit_epsilon": 1.5}, {"reference_classes": 2},
                                 {"preselect_images": 0}])
def test_bad_preselection_settings_are_refused(bad):
    with pytest.raises(GoodnetError, match=r"^nc: "):
        NCScanConfig(**bad)
    with pytest.raises(GoodnetError, match="nc: "):
        build_settings(NCConfig, bad, "nc")
    with pytest.raises(GoodnetError, match="nc: "):
        build_settings(UnlearnConfig, {"scan": bad}, "unlearn")
