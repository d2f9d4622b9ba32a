"""The verdict on a repaired model (issue 29, item 5): the default scanner run on it, and the
proxy ASR of its most suspicious class measured on clean images held out of the scan."""

from __future__ import annotations

import copy

import pytest
import torch

from goodnet.errors import GoodnetError
from goodnet.verdict import MAX_AUTO_CLASSES, judge, verdict_scanner


def test_a_planted_backdoor_is_suspected_and_the_model_is_untouched(backdoored):
    model, clean, _, _ = backdoored
    before = copy.deepcopy(model.state_dict())
    verdict = judge(model, clean)
    assert verdict.scanner == "nc" and verdict.suspected and verdict.classes == (1,)
    assert verdict.candidate == 1 and verdict.score > verdict.threshold == 2.0
    assert verdict.held_out == round(len(clean) / 3)
    assert verdict.proxy_asr is not None and verdict.proxy_asr >= 0.9
    assert "still suspected" in verdict.line() and "class 1" in verdict.line()
    assert verdict.record()["classes"] == [1]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    again = judge(model, clean)
    assert (again.classes, again.score, again.proxy_asr) == (verdict.classes, verdict.score,
                                                             verdict.proxy_asr)


def test_a_clean_model_is_not_suspected(backdoored, clean_cnn):
    _, clean, _, _ = backdoored
    verdict = judge(clean_cnn, clean)
    assert not verdict.suspected and verdict.classes == ()
    assert verdict.score is not None and verdict.score <= verdict.threshold
    assert "no backdoor found" in verdict.line()


def test_which_scanner_a_verdict_runs(backdoored):
    _, clean, _, _ = backdoored
    assert verdict_scanner("auto", clean, 10) == "nc"
    assert verdict_scanner("auto", None, 10) == "mm-bd"
    assert verdict_scanner("auto", clean, MAX_AUTO_CLASSES + 1) is None
    assert verdict_scanner("none", clean, 10) is None
    assert verdict_scanner("mm-bd", clean, 2000) == "mm-bd"
    with pytest.raises(GoodnetError, match="unknown scanner"):
        verdict_scanner("nope", clean, 10)


def test_the_report_sets_the_verdicts_against_the_measured_asr():
    from goodnet.bench.report import verdict_markdown

    def record(suspected, asr):
        return {"verdict": {"suspected": suspected}, "after": {"attack_success_rate": asr}}

    records = [record(True, 0.5), record(False, 0.001), record(False, 0.5), record(True, 0.05),
               record(True, 0.01), {"after": {"attack_success_rate": 0.9}}]  # the last: none
    text = verdict_markdown(records)
    assert "| suspected | 1 | 1 | 1 |" in text and "| not found | 1 | 0 | 1 |" in text
    assert "Right on 3 of 5 cells" in text and "above 10 %: 1." in text
    assert verdict_markdown([{"after": {"attack_success_rate": 0.9}}]) == ""
