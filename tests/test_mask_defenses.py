"""RNP, ANP and CLP: the pieces that decide what they prune, on hand-built networks with and
without BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from goodnet.attacks import make_attack
from goodnet.data.dataset import ImageData
from goodnet.defenses import (
    ANP,
    CLP,
    RNP,
    ANPConfig,
    CLPConfig,
    Evaluation,
    Point,
    RNPConfig,
    Steps,
)
from goodnet.defenses.channel_masks import (
    Choice,
    LearnableMasks,
    all_mask_points,
    binary_masks,
    choose_threshold,
    default_thresholds,
    lowest_masks,
    threshold_curve,
)
from goodnet.defenses.clp import channel_lipschitz, clp_masks
from goodnet.defenses.rnp import _train_mode_accuracy, recover, unlearn
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.models import ModelSpec, build_model
from goodnet.train import TrainConfig, train
from tests.conftest import TRIGGER_COLS, TRIGGER_ROWS, Planted, corner_attack, halves, stripes

CLEAN = halves(200, seed=0)
TEST = halves(200, seed=1)


class ConvBN(nn.Module):
    """conv → BN → ReLU → pool → linear, with non-trivial BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
            self.bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
            self.bn.running_mean.copy_(torch.tensor([0.0, 0.5, -0.5, 1.0]))
            self.bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0]))

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.bn(self.conv(x))))))


# --- the shared mask machinery ----------------------------------------------------------------

def test_mask_points_cover_batchnorm_and_bare_convolutions_and_hidden_neurons():
    assert all_mask_points(ConvBN(), CLEAN) == ["bn"]
    assert all_mask_points(Planted(), CLEAN) == ["conv"]  # no BatchNorm: the convolution
    spec = ModelSpec("small_cnn", 10, 1, 28, 28, (0.5,), (0.25,))
    data = ImageData(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]), 10)
    assert all_mask_points(build_model(spec), data) == ["bn1", "bn2", "fc1"]
    assert all_mask_points(build_model(spec), data, hidden_linear=False) == ["bn1", "bn2"]


def test_noisy_masks_are_the_references_noisy_batchnorm():
    """mask m and noise (δ, ξ) on a BatchNorm equal γ·(m + δ) and β·(1 + ξ) (ANP's
    NoisyBatchNorm2d); without noise, γ·m with β kept (RNP's MaskBatchNorm2d)."""
    model = ConvBN().eval()
    x = torch.rand(5, 1, 6, 6)
    mask = torch.tensor([1.0, 0.5, 0.0, 0.8])
    delta = torch.tensor([0.1, -0.2, 0.3, 0.0])
    xi = torch.tensor([-0.4, 0.2, 0.1, 0.3])
    with LearnableMasks(model, ["bn"], "keep-bias", noise=True) as masks:
        with torch.no_grad():
            masks.masks["bn"].copy_(mask)
            masks.noise["bn"][0].copy_(delta)
            masks.noise["bn"][1].copy_(xi)
        masks.perturb = True
        noisy = model(x)
        masks.perturb = False
        plain = model(x)
    assert not model.bn._forward_hooks
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.bn.weight.mul_(mask + delta)
        reference.bn.bias.mul_(1 + xi)
    assert torch.allclose(noisy, reference(x), atol=1e-6)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.bn.weight.mul_(mask)
    assert torch.allclose(plain, reference(x), atol=1e-6)


def test_thresholds_prune_masks_at_or_below_and_counts_the_lowest():
    values = {"a": torch.tensor([0.0, 0.3, 0.9]), "b": torch.tensor([0.2, 0.25])}
    assert binary_masks(values, 0.2) == {"a": pytest.approx(torch.tensor([0.0, 1.0, 1.0])),
                                         "b": pytest.approx(torch.tensor([0.0, 1.0]))}
    lowest = lowest_masks(values, 3)
    assert lowest["a"].tolist() == [0.0, 1.0, 1.0] and lowest["b"].tolist() == [0.0, 0.0]


def test_the_clean_rule_takes_the_largest_threshold_before_accuracy_first_falls():
    curve = [Point(None, clean_data_accuracy=0.90)] + [
        Point(t, clean_data_accuracy=a)
        for t, a in ((0.0, 0.90), (0.1, 0.89), (0.2, 0.885), (0.3, 0.85), (0.4, 0.89))]
    assert choose_threshold(curve, tolerance=0.02) == 0.2  # 0.4 recovers, but 0.3 broke it
    assert choose_threshold(curve, tolerance=0.1) == 0.4
    assert choose_threshold(curve, tolerance=0.0) == 0.0
    assert choose_threshold([*curve[:1], Point(0.0, clean_data_accuracy=0.5)],
                            tolerance=0.02) is None  # nothing is affordable: prune nothing


def test_choice_settings_are_checked():
    with pytest.raises(GoodnetError, match="select"):
        Choice("best-test-asr", 0.2, 0.0, default_thresholds(), 0.02, 0.2)
    with pytest.raises(GoodnetError, match="select_share"):
        RNPConfig(select_share=1.0)
    with pytest.raises(GoodnetError, match="cannot prune 50 channels"):
        ANP(ANPConfig(iterations=1, select="count", count=50)).repair(Planted(), CLEAN)


# --- CLP -------------------------------------------------------------------------------------

def test_clp_scores_the_batchnorm_folded_kernel():
    model = ConvBN()
    scores = channel_lipschitz(model.conv, model.bn)
    folded = model.conv.weight.detach() * (
        model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    ).detach().view(-1, 1, 1, 1)
    expected = torch.stack([torch.linalg.matrix_norm(k.reshape(1, 9), ord=2) for k in folded])
    assert torch.allclose(scores, expected.abs(), atol=1e-5)


def test_clp_prunes_the_outlying_channel_without_batchnorm():
    """The planted trigger channel has a far larger kernel norm than the two clean ones."""
    result = CLP(CLPConfig(u=1.0)).repair(Planted(), CLEAN)
    assert result.masks.pruned() == {"conv": [2]}
    metrics = evaluate(result.model, TEST, corner_attack())
    assert metrics.attack_success_rate == 0.0 and metrics.clean_accuracy == 1.0
    # u = 3 (the default) cannot flag anything among three channels: the largest z-score of
    # three values is 2/sqrt(3).
    assert CLP().repair(Planted(), CLEAN).masks.pruned() == {"conv": []}


def test_clp_threshold_is_per_layer_mean_plus_u_std():
    scores = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0]), "b": torch.tensor([5.0, 5.0])}
    masks = clp_masks(scores, 1.5)
    assert masks["a"].tolist() == [1, 1, 1, 1, 0] and masks["b"].tolist() == [1, 1]


def test_clp_curve_is_reported_per_u_and_does_not_change_the_choice():
    plain = CLP(CLPConfig(u=1.0)).repair(Planted(), CLEAN)
    measured = CLP(CLPConfig(u=1.0)).repair(Planted(), CLEAN,
                                            evaluation=Evaluation(TEST, corner_attack()))
    assert plain.masks.pruned() == measured.masks.pruned()
    assert measured.curve.axis == "u"
    by_u = {p.x: p for p in measured.curve.points}
    assert by_u[1.0].test_asr == 0.0 and by_u[10.0].test_asr == 1.0


def test_clp_runs_without_data_on_a_model_that_knows_its_input():
    """build_model sets ``input_shape``: CLP traces the layer order with a blank input and needs
    no clean data; the data, when given, changes nothing but the reported accuracy."""
    model = build_model(ModelSpec("small_cnn", 10, 1, 28, 28, (0.5,), (0.25,)), seed=0)
    free = CLP(CLPConfig(u=1.0)).repair(model)
    assert free.pruned_count > 0 and free.masks.pruned().keys() == {"bn1", "bn2"}
    assert free.curve.mark(free.chosen).pruned == free.pruned_count
    assert all(p.clean_data_accuracy is None for p in free.curve.points)
    data = ImageData(torch.rand(20, 1, 28, 28), torch.arange(20) % 10, 10)
    given = CLP(CLPConfig(u=1.0)).repair(model, data)
    assert given.pruned == free.pruned
    assert all(p.clean_data_accuracy is not None for p in given.curve.points)


def test_clp_without_data_or_input_shape_says_what_is_missing():
    assert not hasattr(Planted(), "input_shape")
    with pytest.raises(GoodnetError, match="without clean data the model's input shape is unknown"):
        CLP().repair(Planted())


# --- RNP -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    """A small CNN that has learnt the stripes task, and its clean data."""
    data = stripes(128, num_classes=4, size=16, seed=3)
    spec = ModelSpec("small_cnn", 4, 1, 16, 16, (0.5,), (0.25,))
    model = build_model(spec, seed=0)
    train(model, data, TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=0))
    assert evaluate(model, data).clean_accuracy > 0.9
    return model, data


# The stripes classes flip whole, so accuracy moves in quarters: the window [0.495, 0.55] holds
# 0.5, and a collapse to chance (0.25) is an overshoot.
UNLEARN = {"clean_threshold": 0.55, "overshoot": 0.9, "unlearn_lr": 0.2, "batch_size": 32}


@pytest.mark.parametrize("lr", [0.2, 2.0])
def test_unlearning_stops_per_step_inside_the_window(trained, lr):
    """Checked after every step, with an overshooting step retried at a smaller lr, the ascent
    stops between overshoot × threshold and the threshold, even with a violent lr."""
    model, data = trained
    cfg = RNPConfig(**{**UNLEARN, "unlearn_lr": lr})
    unlearned, log = unlearn(model, data, cfg)
    accuracy = _train_mode_accuracy(unlearned, data, cfg.batch_size)
    assert log["reached"]
    assert cfg.overshoot * cfg.clean_threshold <= accuracy <= cfg.clean_threshold
    assert log["accuracy"][-1] == pytest.approx(accuracy, abs=1e-4)


def test_without_backtracking_a_violent_ascent_overshoots(trained):
    model, data = trained
    cfg = RNPConfig(**{**UNLEARN, "unlearn_lr": 2.0, "backtracks": 0})
    unlearned, log = unlearn(model, data, cfg)
    assert log["reached"] and log["backtracks"] == 0
    floor = cfg.overshoot * cfg.clean_threshold
    assert _train_mode_accuracy(unlearned, data, cfg.batch_size) < floor


def test_reference_unlearning_checks_once_per_epoch_and_does_not_clip(trained):
    model, data = trained
    cfg = RNPConfig(**UNLEARN, reference=True)
    assert cfg.stop == "epoch" and cfg.clip_norm is None
    _, log = unlearn(model, data, cfg)
    assert log["steps"] % 4 == 0  # whole epochs of 128 / 32 batches
    assert len(log["accuracy"]) == log["steps"] // 4


def test_unlearning_that_never_reaches_the_threshold_says_so(trained):
    model, data = trained
    _, log = unlearn(model, data, RNPConfig(unlearn_lr=1e-6, unlearn_epochs=1,
                                            batch_size=32))
    assert not log["reached"] and log["steps"] == 4


def test_rnp_holds_out_clean_data_and_reports_its_threshold_curve(trained):
    model, data = trained
    cfg = RNPConfig(**UNLEARN, mask_epochs=3)
    result = RNP(cfg).repair(model, data)
    assert result.notes["held_out"] == round(0.2 * len(data))
    points = result.curve.points
    assert result.curve.axis == "threshold"
    assert [p.x for p in points] == [None, *cfg.thresholds]
    pruned = [p.pruned for p in points]
    assert pruned == sorted(pruned)  # a higher threshold never prunes less
    chosen = result.notes["threshold"]
    if chosen is None:
        assert result.chosen == "none" and not result.notes["pruned_channels"]
    else:
        assert result.chosen == f"t={chosen:.2f}"
        point = next(p for p in points if p.x == chosen)
        assert result.curve.mark(result.chosen) == point
        loss = points[0].clean_data_accuracy - point.clean_data_accuracy
        assert loss <= 0.02 + 1e-9
    fixed = RNP(RNPConfig(**{**cfg.__dict__, "select": "threshold", "threshold": 0.5}))
    assert fixed.repair(model, data).notes["threshold"] == 0.5


def test_recovering_masks_the_channel_that_breaks_clean_accuracy():
    """An "unlearned" planted network: channel 2 now fires on every clean image (≈ 0.47) and
    pushes class 1 by 40 × that, so class-0 inputs are misclassified. The loss gradient on its
    mask is positive on every misclassified input, so recovering drives it to 0, while the two
    clean channels keep their masks near 1."""
    model = Planted()
    with torch.no_grad():
        model.conv.weight[2, 0] = 1 / 64
        model.conv.bias[2] = 0.0
        model.fc.weight[:, 2] = torch.tensor([0.0, 40.0])
    assert evaluate(model, TEST).clean_accuracy == 0.5
    values = recover(model, CLEAN, ["conv"], RNPConfig(mask_epochs=10, batch_size=32))
    assert values["conv"][2] == 0.0 and values["conv"][:2].min() > 0.9
    assert all(0 <= v <= 1 for v in values["conv"].tolist())


# --- ANP -------------------------------------------------------------------------------------

class Sensitive(Planted):
    """The planted network with a backdoor channel that is not dormant: channel 2 also sums the
    whole image faintly (≈ 0.47 on clean data), its push towards class 0 cancelled by the output
    bias. Useless on clean data, it is the channel whose perturbation moves the logits most
    (weight 20 against 10 for the clean channels): what ANP's adversarial noise exposes."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.conv.weight[2, 0] = 1 / 64
            self.conv.weight[2, 0, TRIGGER_ROWS, TRIGGER_COLS] = 1.0
            self.conv.bias[2] = 0.0
            self.fc.weight[0, 2] = 20.0
            self.fc.bias[0] = -20.0 * 0.5 * 60 / 64


def test_anp_finds_and_removes_a_sensitive_planted_channel():
    model = Sensitive()
    assert evaluate(model, TEST, corner_attack()).attack_success_rate == 1.0
    result = ANP(ANPConfig(iterations=200, batch_size=64, select="threshold")).repair(
        model, halves(400, seed=0))
    assert 2 in result.notes["pruned_channels"]["conv"]
    metrics = evaluate(result.model, TEST, corner_attack())
    assert metrics.attack_success_rate == 0.0 and metrics.clean_accuracy == 1.0


def test_anp_without_noise_leaves_a_fitted_model_unpruned(trained):
    """With noise_eps = 0 the masks only minimise the clean loss of a model that already fits: they
    stay high, and nothing is pruned at the paper's threshold."""
    model, data = trained
    result = ANP(ANPConfig(noise_eps=0.0, iterations=30, select="threshold")).repair(model, data)
    assert sum(len(v) for v in result.notes["pruned_channels"].values()) == 0


def test_anp_noise_lowers_masks_and_projection_is_a_setting(trained):
    model, data = trained
    settings = {"iterations": 60, "batch_size": 32, "select": "threshold"}
    noisy = ANP(ANPConfig(noise_eps=0.4, **settings)).repair(model, data)
    quiet = ANP(ANPConfig(noise_eps=0.0, **settings)).repair(model, data)
    mean = {name: sum(sum(v) for v in r.notes["mask_values"].values())
            for name, r in (("noisy", noisy), ("quiet", quiet))}
    assert mean["noisy"] < mean["quiet"]
    projected = ANP(ANPConfig(noise_eps=0.4, project=True, **settings)).repair(model, data)
    assert projected.notes["mask_values"] != noisy.notes["mask_values"]


def test_thresholds_that_prune_alike_are_measured_once():
    """Masks of 0 and 1 prune the same channels at every threshold below 1: the curve has a
    record per threshold, but the model is measured only unpruned and pruned."""
    calls = []

    class Counting(Evaluation):
        def measure(self, model):
            calls.append(1)
            return super().measure(model)

    values = {"conv": torch.tensor([1.0, 1.0, 0.0])}
    choice = Choice("threshold", 0.2, 0.05, default_thresholds(), 0.02, 0.2)
    curve = threshold_curve(Planted(), values, choice, "channel", CLEAN,
                            Steps(Counting(TEST, corner_attack())))
    assert len(curve) == 1 + len(default_thresholds()) and len(calls) == 2
    assert [p.x for p in curve] == [None, *default_thresholds()]
    assert all(p.pruned == 1 and p.test_asr == curve[1].test_asr for p in curve[1:])
    assert curve[0].pruned == 0 and curve[1].test_asr == 0.0


# --- what RNP and ANP choose from ------------------------------------------------------------

@pytest.mark.parametrize("name", ["rnp", "anp"])
def test_a_test_asr_that_points_elsewhere_does_not_move_the_threshold(trained, name):
    """On the stripes network the learned masks are graded, so the thresholds prune more and
    more channels (unlike the planted network's masks of exactly 0 or 1). The corner patch means
    nothing to this model, so its test ASR is equal at every threshold and a rule minimising it
    would take the first, least pruning one; the clean rule takes the last. The repair with the
    evaluation must be the repair without it."""
    model, data = trained
    defense = RNP(RNPConfig(**UNLEARN, mask_epochs=3)) if name == "rnp" \
        else ANP(ANPConfig(iterations=60, batch_size=32))
    attack = make_attack("badnets", {"patch_size": 3, "margin": 0, "target": 0}, (1, 16, 16), 4)
    evaluation = Evaluation(stripes(100, num_classes=4, size=16, seed=4), attack)
    plain = defense.repair(model, data)
    measured = defense.repair(model, data, evaluation=evaluation)
    chosen = measured.curve.mark(measured.chosen)
    lowest = min(measured.curve.sweep()[1:], key=lambda p: p.test_asr)
    assert plain.pruned_count > 0 and lowest.pruned != chosen.pruned  # a leak would show
    assert measured.chosen == plain.chosen and measured.pruned == plain.pruned
    assert measured.notes == plain.notes
    x, _ = data.get(torch.arange(16))
    assert torch.equal(measured.model.eval()(x), plain.model.eval()(x))
