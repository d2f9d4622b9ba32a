"""The GoodNet detector on hand-built models with known disagreements."""

from __future__ import annotations

import torch
from torch import nn

from goodnet.artifacts import ModelCard, save_model
from goodnet.attacks import make_attack
from goodnet.data.dataset import ImageData
from goodnet.detector import GoodNet
from goodnet.masking import MaskSet, masked
from goodnet.metrics import detector_predictions, evaluate, predict_all, score
from goodnet.model_files import load_model
from goodnet.models import ModelSpec, build_model
from tests.conftest import Planted, corner_attack, halves


class Fixed(nn.Module):
    """Answers a fixed class per input position in the batch (logits one-hot × 5)."""

    def __init__(self, answers: list[int], classes: int = 3) -> None:
        super().__init__()
        self.answers = torch.tensor(answers)
        self.classes = classes
        self.out = nn.Linear(1, classes)  # gives the GoodNet its class count

    def forward(self, x):
        return nn.functional.one_hot(self.answers[: len(x)], self.classes).float() * 5


def test_agreement_keeps_the_class_and_disagreement_answers_n():
    goodnet = GoodNet(Fixed([0, 1, 2, 1]), Fixed([0, 2, 2, 0]))
    assert goodnet.reject_class == 3
    out = goodnet(torch.zeros(4, 1))
    assert out.shape == (4, 4)
    assert out.argmax(1).tolist() == [0, 3, 2, 3]


def test_goodnet_metrics_on_the_planted_backdoor():
    original = Planted()
    repaired = masked(original, MaskSet({"conv": torch.tensor([1.0, 1.0, 0.0])}))
    goodnet = GoodNet(original, repaired)
    metrics = evaluate(goodnet, halves(200, seed=1), corner_attack(), reject_class=2)
    assert metrics.clean_accuracy == 1.0 and metrics.false_alarm_rate == 0.0
    # Triggered class-1 inputs: the BadNet says 0, the repaired net 1: flagged, every one.
    assert metrics.detection_rate == 1.0 and metrics.attack_success_rate == 0.0


def test_goodnet_saves_and_loads_as_one_file(tmp_path):
    spec = ModelSpec("small_cnn", 10, 1, 28, 28, (0.5,), (0.25,))
    original = build_model(spec, seed=0)
    mask = torch.ones(64)
    mask[:20] = 0
    goodnet = GoodNet(original, masked(original, MaskSet({"bn2": mask})))
    path = save_model(tmp_path / "g.safetensors", goodnet, ModelCard(spec=spec))
    loaded = load_model(path)
    assert loaded.card.kind == "goodnet"
    assert isinstance(loaded.model, GoodNet)
    assert loaded.model.repaired.masks.pruned() == {"bn2": list(range(20))}
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(loaded.model(x).argmax(1), goodnet(x).argmax(1))


def test_goodnet_metrics_from_predictions_equal_running_the_goodnet():
    """The benchmark derives GoodNet figures from its two models' predictions: they must be
    exactly what running the GoodNet gives, on random nets that disagree often."""
    spec = ModelSpec("small_cnn", 10, 1, 28, 28, (0.5,), (0.25,))
    original = build_model(spec, seed=0)
    other = build_model(spec, seed=1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    test = ImageData(images, labels, 10)
    attack = make_attack("badnets", {}, (1, 28, 28), 10)
    direct = evaluate(GoodNet(original, other), test, attack, reject_class=10)
    predictions = predict_all({"a": original, "b": other}, test, attack)
    derived = score(detector_predictions(predictions["a"], predictions["b"], 10), 10)
    assert 0 < derived.false_alarm_rate < 1  # the two random nets do disagree sometimes
    assert derived == direct


# --- GoodNets with calibrated detectors (issue 18) -------------------------------------------

def _calibrated(backdoored, false_alarm=0.05, detectors=None):
    from goodnet.data import split_clean
    from goodnet.detector import calibrated
    from tests.conftest import stripes

    model, clean, _, _ = backdoored
    calibration, _ = split_clean(stripes(1200, seed=11), 300, seed=0)
    return calibrated(model, model, detectors or {"strip": {"overlays": 30},
                                                  "scale-up": {"soft": True}},
                      clean, calibration, false_alarm)


def test_a_calibrated_goodnet_flags_triggers_and_few_clean_inputs(backdoored):
    import math

    from tests.conftest import stripes

    _, _, test, attack = backdoored
    goodnet = _calibrated(backdoored)
    assert [s.detector for s in goodnet.screens] == ["strip", "scale-up"]
    assert all(s.false_alarm == 0.025 and s.calibration_images == 300 for s in goodnet.screens)
    assert not goodnet.disagree
    fresh = stripes(1000, seed=12)
    metrics = evaluate(goodnet, fresh, attack, reject_class=4)
    # two detectors at 2.5 % each: at most 5 % together, within sampling error
    assert metrics.false_alarm_rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 1000)
    assert metrics.detection_rate >= 0.5  # the repaired model here is the BadNet itself
    x, _ = test.get(torch.arange(8))
    assert set(goodnet.scores(x)) == {"strip", "scale-up"}


def test_a_goodnet_with_detectors_round_trips_through_its_file(backdoored, tmp_path):
    from goodnet.models import spec_for_data
    from tests.conftest import stripes

    _, _, test, _ = backdoored
    goodnet = _calibrated(backdoored, detectors={"strip": {"overlays": 30},
                                                 "scale-up": {"soft": True}, "mahalanobis": {}})
    spec = spec_for_data("small_cnn", stripes(800, seed=0))  # the backdoored model's
    path = save_model(tmp_path / "g.safetensors", goodnet, ModelCard(spec=spec))
    loaded = load_model(path).model
    assert isinstance(loaded, GoodNet) and loaded.screens == goodnet.screens
    assert loaded.disagree is False
    assert torch.equal(loaded.detections["strip"].get_buffer("overlays"),
                       goodnet.detections["strip"].get_buffer("overlays"))
    assert torch.equal(loaded.detections["mahalanobis"].get_buffer("precision"),
                       goodnet.detections["mahalanobis"].get_buffer("precision"))
    x, _ = test.get(torch.arange(64))
    assert torch.equal(loaded(x), goodnet(x))
    for name, expected in goodnet.scores(x).items():
        assert torch.allclose(loaded.scores(x)[name], expected)


def test_a_goodnet_file_with_bad_detector_parts_is_refused(backdoored, tmp_path):
    import json

    import pytest
    from safetensors.torch import load_file, save_file

    from goodnet.artifacts import CARD_KEY
    from goodnet.errors import GoodnetError
    from goodnet.models import spec_for_data
    from tests.conftest import stripes

    goodnet = _calibrated(backdoored, detectors={"strip": {"overlays": 20}})
    spec = spec_for_data("small_cnn", stripes(800, seed=0))  # the backdoored model's
    path = save_model(tmp_path / "g.safetensors", goodnet, ModelCard(spec=spec))
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        card = json.loads(handle.metadata()[CARD_KEY])

    def write(name, tensors, card):
        target = tmp_path / name
        save_file(tensors, target, metadata={CARD_KEY: json.dumps(card)})
        return target

    bigger = dict(tensors)
    bigger["extra/detector/strip/overlays"] = torch.rand(21, 1, 16, 16)
    with pytest.raises(GoodnetError, match="strip: expected overlays"):
        load_model(write("big.safetensors", bigger, card))
    stray = dict(tensors)
    stray["extra/detector/frost/x"] = torch.zeros(1)
    with pytest.raises(GoodnetError, match="belongs to no detector"):
        load_model(write("stray.safetensors", stray, card))
    broken = json.loads(json.dumps(card))
    del broken["notes"]["goodnet"]["screens"][0]["threshold"]
    with pytest.raises(GoodnetError, match="malformed detector record"):
        load_model(write("broken.safetensors", tensors, broken))
    unknown = json.loads(json.dumps(card))
    unknown["notes"]["goodnet"]["screens"][0]["detector"] = "frost"
    with pytest.raises(GoodnetError, match="unknown detector 'frost'"):
        load_model(write("unknown.safetensors", tensors, unknown))
