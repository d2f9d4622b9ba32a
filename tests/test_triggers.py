"""Reverse-engineered triggers: saved without pickles, read back identical, drawn, refused
when the file is not one."""

from __future__ import annotations

import json

import pytest
import torch

from goodnet.defenses.base import ScanVerdict, Trigger
from goodnet.errors import GoodnetError
from goodnet.triggers import load_triggers, plot_triggers, save_triggers, verdict_summary


def verdict(channels: int = 1) -> ScanVerdict:
    generator = torch.Generator().manual_seed(0)
    triggers = tuple(
        Trigger(c, torch.rand(1, 8, 8, generator=generator),
                torch.rand(channels, 8, 8, generator=generator), norm=10.0 + c, success=0.99)
        for c in range(3))
    return ScanVerdict(backdoored=True, targets=(1,), score=3.5, threshold=2.0,
                       scores=(0.1, 3.5, float("nan")), triggers=triggers)


def test_triggers_round_trip(tmp_path):
    original = verdict()
    path = save_triggers(tmp_path / "triggers.safetensors", original)
    loaded = load_triggers(path)
    assert loaded.backdoored and loaded.targets == (1,) and loaded.score == 3.5
    assert loaded.scores[:2] == (0.1, 3.5) and loaded.scores[2] != loaded.scores[2]  # nan kept
    for a, b in zip(original.triggers, loaded.triggers, strict=True):
        assert a.target == b.target and a.norm == b.norm
        assert torch.equal(a.mask, b.mask) and torch.equal(a.pattern, b.pattern)
    assert json.dumps(verdict_summary(original))  # plain JSON, nan as null
    assert verdict_summary(original)["scores"][2] is None


def test_a_trigger_stamps_where_its_mask_is():
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = 1.0
    trigger = Trigger(0, mask, torch.ones(1, 4, 4), norm=1.0, success=1.0)
    stamped = trigger.apply(torch.zeros(2, 1, 4, 4))
    assert stamped[:, 0, 0, 0].eq(1).all() and stamped.sum() == 2


@pytest.mark.parametrize("channels", [1, 3])
def test_triggers_are_drawn(tmp_path, channels):
    path = plot_triggers(tmp_path / "t.png", verdict(channels))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_file_that_is_not_a_triggers_file_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(GoodnetError, match="not a goodnet triggers file"):
        load_triggers(bad)
    with pytest.raises(GoodnetError, match="no such file"):
        load_triggers(tmp_path / "missing.safetensors")
