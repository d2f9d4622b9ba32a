"""The contract every registered scanner keeps, at the quick settings its class declares, on
the planted-backdoor network of ``tests/conftest.py``: the caller's model (weights and mode) and
the global random state are left alone, the same seed gives the same verdict, the report has one
score per class, and a clean network is not flagged."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.scans import SCANNERS, ScanReport, make_scanner
from goodnet.settings import key_names


def quick_scan(name: str, model: torch.nn.Module, clean) -> ScanReport:
    return make_scanner(name, SCANNERS[name].quick).scan(model, clean)


@pytest.mark.parametrize("name", sorted(SCANNERS))
def test_every_scanner_declares_quick_settings(name):
    assert "quick" in vars(SCANNERS[name])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(SCANNERS))
def test_scanner_contract(backdoored, name, mode):
    shared, clean, _, _ = backdoored
    model = copy.deepcopy(shared).train(mode == "train")  # the fixture is shared: a copy
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    first = quick_scan(name, model, clean)
    # The caller's model is untouched, its mode kept; the global random state too.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training == (mode == "train")
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    # Same settings and seed: the same verdict (reversed triggers compare by their tensors).
    second = quick_scan(name, model, clean)
    one, other = first.verdict, second.verdict
    assert (one.backdoored, one.targets, one.score, one.threshold, one.scores) == \
        (other.backdoored, other.targets, other.score, other.threshold, other.scores)
    assert len(one.triggers) == len(other.triggers)
    for a, b in zip(one.triggers, other.triggers, strict=True):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)
    # One score per class, in class order.
    assert first.classes == clean.num_classes == len(first.verdict.scores) == 4
    assert first.scanner == name and first.seconds > 0
    assert first.verdict.score == first.verdict.score  # a number, not NaN


@pytest.mark.parametrize("name", sorted(SCANNERS))
def test_a_clean_network_is_not_flagged(clean_cnn, backdoored, name):
    _, clean, _, _ = backdoored
    report = quick_scan(name, clean_cnn, clean)
    assert not report.backdoored and report.targets == ()


@pytest.mark.parametrize(("name", "old", "new", "value"), [
    ("nc", "lr", "trigger_lr", 0.05), ("mm-bd", "lr", "trigger_lr", 0.02),
    ("mm-bd", "steps", "max_steps", 30)])
def test_an_old_setting_name_still_works_with_a_warning_and_keeps_its_key(name, old, new, value):
    """Renamed scanner settings (docs/settings.md)."""
    with pytest.warns(FutureWarning, match=f"'{old}' is now called '{new}'"):
        scanner = make_scanner(name, {old: value})
    assert getattr(scanner.config, new) == value
    assert key_names(type(scanner.config), {new: value}) == {old: value}
