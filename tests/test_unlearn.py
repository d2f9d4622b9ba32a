"""Unlearning a reversed trigger for every class (issue 29, item 1): where Neural Cleanse's
outlier test flags nothing and NC returns the backdoored model unchanged, the same reversed
triggers, all unlearned, remove the backdoor; the settings nest the scanner's."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.defenses import make_defense
from goodnet.defenses.nc import NCConfig, NeuralCleanse
from goodnet.defenses.unlearn import Unlearn, UnlearnConfig
from goodnet.errors import GoodnetError
from goodnet.metrics import evaluate
from goodnet.scans.nc import NCScanConfig

SCAN = {"epochs": 6, "anomaly_threshold": 1e6}  # no class is ever an outlier
SETTINGS = {"scan": SCAN, "unlearn_epochs": 10, "unlearn_batch_size": 32}


@pytest.fixture(scope="module")
def unlearned(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    return make_defense("unlearn", SETTINGS).repair(model, clean), before


def test_every_class_is_unlearned_where_nc_flags_none(backdoored, unlearned):
    model, clean, test, attack = backdoored
    result, before = unlearned
    nc = NeuralCleanse(NCConfig(epochs=6, anomaly_threshold=1e6)).repair(model, clean)
    assert nc.scan is not None and not nc.scan.targets and nc.chosen == "unchanged"
    assert evaluate(nc.model, test, attack).attack_success_rate >= 0.95  # NC: left as it was
    assert result.scan is not None and not result.scan.targets  # the same scan flags nothing
    metrics = evaluate(result.model, test, attack)
    assert metrics.attack_success_rate <= 0.1 and metrics.clean_accuracy >= 0.95
    assert result.notes["flagged"] == [] and result.notes["unlearning_images"] == 40
    extras = [dict(p.extra) for p in result.curve.points]
    assert extras[-1]["trigger_success"] < extras[1]["trigger_success"] or \
        extras[-1]["trigger_success"] <= 0.2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_same_seed_gives_the_same_weights(backdoored, unlearned):
    model, clean, _, _ = backdoored
    result, _ = unlearned
    again = make_defense("unlearn", SETTINGS).repair(model, clean)
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))


def test_the_scan_settings_nest_and_are_checked():
    defense = make_defense("unlearn", {"scan": {"epochs": 2}}, text=False)
    assert isinstance(defense, Unlearn)
    assert defense.config.scan == NCScanConfig(epochs=2)
    text = make_defense("unlearn", {"scan": "{epochs: 3, trigger_lr: 0.05}"}, text=True)
    assert text.config.scan == NCScanConfig(epochs=3, trigger_lr=0.05)
    assert UnlearnConfig().scan == NCScanConfig()
    with pytest.raises(GoodnetError, match="setting scan has no setting 'epoch'"):
        make_defense("unlearn", {"scan": {"epoch": 2}})
    with pytest.raises(GoodnetError, match="unlearn_share must be in"):
        make_defense("unlearn", {"unlearn_share": 0})


def test_the_flagged_classes_can_keep_ncs_share(backdoored):
    """``flagged_share``: where NC flags the target, its share of stamped images goes to the
    flagged trigger (as ``nc`` unlearns it) and ``unlearn_share`` more to every class's."""
    from goodnet.defenses.nc import unlearning_data

    model, clean, test, attack = backdoored
    both = make_defense("unlearn", {"scan": {"epochs": 6}, "flagged_share": 0.2,
                                    "unlearn_epochs": 10, "unlearn_batch_size": 32})
    result = both.repair(model, clean)
    assert result.notes["flagged"] == [1] and result.notes["unlearning_images"] == 80
    assert evaluate(result.model, test, attack).attack_success_rate <= 0.1
    triggers = list(result.scan.triggers)
    data = unlearning_data(clean, [triggers[1]], 0.2, 0, more=(triggers, 0.2))
    flagged = [g for g in data.groups if g.name == "trigger 1"]
    assert len(flagged) == 1 and len(flagged[0].indices) == 40
    assert sum(len(g.indices) for g in data.groups) == 80  # disjoint: PoisonedData checks
    with pytest.raises(GoodnetError, match="flagged_share"):
        make_defense("unlearn", {"flagged_share": 1.0})
