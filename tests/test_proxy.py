"""Choosing a pruning by a reversed trigger (``select="proxy"``): the rule reads only clean
accuracy and the proxy ASR, keeps within the tolerance and prefers the smaller pruning; the
proxy ASR counts other classes only; prune, RNP and ANP record the proxy per point, choose its
lowest point, and an evaluation changes nothing they choose."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.defenses import make_defense
from goodnet.defenses.base import Evaluation, Point, Trigger
from goodnet.defenses.proxy import EXTRA, Proxy, choose_by_proxy, proxy_asr, reversed_proxy
from goodnet.errors import GoodnetError
from tests.conftest import TRIGGER_COLS, TRIGGER_ROWS, Planted, halves


def point(accuracy: float, proxy: float, x: float | None = None) -> Point:
    return Point(x, clean_data_accuracy=accuracy, extra=((EXTRA, proxy),))


def test_the_lowest_proxy_within_the_tolerance_wins_and_ties_go_to_the_smaller_pruning():
    points = [point(0.90, 0.9), point(0.89, 0.5), point(0.885, 0.2), point(0.88, 0.2),
              point(0.70, 0.0)]
    assert choose_by_proxy(points, 0.02) == 2  # 4 has the lowest proxy but costs 20 points
    assert choose_by_proxy(points, 0.25) == 4
    assert choose_by_proxy(points, 0.005) == 0  # only the unpruned model is close enough


def test_a_pruning_that_does_not_lower_the_proxy_is_not_made():
    points = [point(0.9, 0.3), point(0.9, 0.3), point(0.9, 0.4)]
    assert choose_by_proxy(points, 0.02) == 0


def test_a_point_beyond_the_tolerance_is_skipped_not_a_stop():
    """Unlike the clean rule, a later point back within the tolerance still competes."""
    points = [point(0.9, 0.9), point(0.5, 0.0), point(0.895, 0.1)]
    assert choose_by_proxy(points, 0.02) == 2


def corner_trigger(target: int = 0) -> Trigger:
    mask = torch.zeros(1, 8, 8)
    mask[:, TRIGGER_ROWS, TRIGGER_COLS] = 1.0
    return Trigger(target, mask, torch.ones(1, 8, 8), float(mask.sum()), 1.0)


def test_the_proxy_asr_counts_the_other_classes_only():
    data = halves(40)
    assert proxy_asr(Planted(), data, corner_trigger(0)) == 1.0  # every class-1 image flips
    blank = Trigger(0, torch.zeros(1, 8, 8), torch.ones(1, 8, 8), 0.0, 0.0)
    assert proxy_asr(Planted(), data, blank) == 0.0
    assert proxy_asr(Planted(), data, corner_trigger(1)) == 0.0  # the corner sends to 0, not 1


def test_the_reversed_proxy_is_the_planted_target_and_leaves_the_model_alone(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    proxy = reversed_proxy(model, clean)
    assert isinstance(proxy, Proxy) and proxy.trigger.target == 1 and proxy.flagged
    assert proxy_asr(model, clean, proxy.trigger) > 0.9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


FAST = {"rnp": {"clean_threshold": 0.3, "unlearn_lr": 0.2, "batch_size": 32,
                "mask_epochs": 3},
        "anp": {"iterations": 60, "batch_size": 32}, "prune": {}}


@pytest.fixture(scope="module", params=sorted(FAST))
def proxied(request, backdoored):
    model, clean, test, attack = backdoored
    defense = make_defense(request.param, {**FAST[request.param], "select": "proxy"})
    evaluation = Evaluation(test, attack)
    return request.param, defense.repair(model, clean), defense.repair(model, clean,
                                                                         evaluation=evaluation)


def tolerance(name: str, repaired) -> float:
    return repaired.settings["max_drop"]  # prune's, and RNP's and ANP's (one name for all)


def test_the_choice_is_the_lowest_proxy_point_within_the_tolerance(proxied):
    name, repaired, _ = proxied
    assert repaired.notes["proxy_class"] == 1 and repaired.notes["proxy_flagged"]
    sweep = list(repaired.curve.sweep())
    assert sweep and all(EXTRA in dict(p.extra) for p in sweep)
    chosen = repaired.curve.mark(repaired.chosen)
    base = sweep[0].clean_data_accuracy
    allowed = [p for p in sweep if base - p.clean_data_accuracy <= tolerance(name, repaired)
               + 1e-12]
    assert base - chosen.clean_data_accuracy <= tolerance(name, repaired) + 1e-12
    assert dict(chosen.extra)[EXTRA] == min(dict(p.extra)[EXTRA] for p in allowed)
    if name != "rnp":  # ANP and prune reach the planted channel within the tolerance; RNP's
        # masks at these short settings do not, and it then keeps the model unpruned
        assert dict(chosen.extra)[EXTRA] < dict(sweep[0].extra)[EXTRA]
    else:
        assert repaired.chosen == "none" or dict(chosen.extra)[EXTRA] < dict(sweep[0].extra)[
            EXTRA]


def test_an_evaluation_changes_nothing_the_proxy_chooses(proxied):
    _, plain, measured = proxied
    assert measured.chosen == plain.chosen and measured.pruned == plain.pruned
    assert measured.notes == plain.notes
    assert all(p.test_asr is not None for p in measured.curve.sweep())


def test_prune_select_is_checked_and_a_number_is_the_old_max_drop():
    with pytest.raises(GoodnetError, match="select must be one of"):
        make_defense("prune", {"select": "lowest"})
    with pytest.raises(GoodnetError, match="rule='within'"):
        make_defense("prune", {"select": "proxy", "rule": "lab"})
    with pytest.warns(FutureWarning, match="'select' is now called 'max_drop'"):
        assert make_defense("prune", {"select": "0.1"}).config.max_drop == 0.1
    with pytest.raises(GoodnetError, match="select must be one of"):
        make_defense("rnp", {"select": "budget"})


def test_a_bench_record_keeps_what_the_repair_suspected(proxied, backdoored):
    """A grid cell records the class a proxy chose by (and NC's verdict, where there is one),
    so a benchmark can say how often the reversed trigger was the attack's."""
    from goodnet.defenses.nc import NCConfig, NeuralCleanse
    from goodnet.pipeline import suspected

    _, repaired, _ = proxied
    assert suspected(repaired) == {"proxy": {"class": 1, "flagged": True,
                                          "anomaly_index": repaired.notes["proxy_anomaly_index"],
                                          "norm": repaired.notes["proxy_norm"]}}
    model, clean, _, _ = backdoored
    nc = NeuralCleanse(NCConfig(unlearn_epochs=1)).repair(model, clean)
    assert suspected(nc) == {"backdoored": True, "targets": [1], "score": nc.scan.score}
    assert suspected(make_defense("clp").repair(model, clean)) is None
