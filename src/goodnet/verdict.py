"""After a repair: is a backdoor still suspected? (issue 29, item 5)

A defense that finds nothing to remove returns the model it was given, and a repair that
removes part of a backdoor looks, on clean data, like one that removed all of it. So the
repaired model is scanned the way ``goodnet scan`` scans a model (the default scanner for the
data given: Neural Cleanse with clean data, MM-BD without), and the result says so:

- ``suspected``: the scanner's own verdict on the repaired model (Neural Cleanse: a class whose
  reversed trigger's anomaly index exceeds 2), with the flagged classes, the statistic and its
  threshold.
- ``proxy_asr``: the share of held-out clean images of other classes that the most suspicious
  class's trigger, reverse-engineered *on the repaired model*, sends to that class. The trigger
  is reversed on two thirds of the clean images and measured on the other third (a stratified
  split with ``seed``), so the figure says whether a small universal trigger still exists, not
  how well the optimiser fitted its own images. It is recorded beside the verdict and does not
  decide it. On the zoo's seed 0 (``benchmarks/unlearn_verdict.yaml``, 60 repairs) it was
  98.9-100 % on every repaired model, backdoor gone or not: Neural Cleanse optimises each
  class's trigger until it moves 99 % of the images, and on these networks it gets there for
  any class, so the figure carries no signal yet and ``goodnet repair`` does not print it. What
  would give one: a reverse engineering held to the original trigger's mask norm, or the
  original model's trigger measured again on the repaired model.

Everything reads only the clean data the repair was given (or none); never test data.
What it cannot do: a scanner that misses a backdoor in the original model (a warping trigger
that Neural Cleanse's patch masks cannot express, say) misses it in the repaired one too; the
verdict is evidence, not proof, and the bench report tabulates it against the measured ASR (on
that grid it was right on 25 of 60 repairs).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from goodnet.data import split_clean
from goodnet.data.dataset import ImageData
from goodnet.defenses.proxy import proxy_asr
from goodnet.scans import default_scanner, make_scanner
from goodnet.scans.base import ScanReport

HELD_OUT = 1 / 3  # the share of the clean images the proxy ASR is measured on
AUTO = "auto"  # the default scanner, on models of at most MAX_AUTO_CLASSES classes
NONE = "none"
# Reverse-engineering every class grows with their number (Neural Cleanse: about 3 s a class
# for the small CNN here): above this, a verdict runs only where the user names a scanner.
# Above 100 classes Neural Cleanse now pre-selects candidates (K-Arm), so its time is bounded,
# but on the lab's 1283-class network a verdict would add a second scan of several minutes to
# the repair (benchmarks/deepid_time.py); the default stays off there, --verdict nc asks.
MAX_AUTO_CLASSES = 100


@dataclass(frozen=True)
class Verdict:
    """What a scan of the repaired model says.

    Attributes:
        scanner: the scanner's registry name.
        suspected: whether it judges the repaired model backdoored.
        classes: the classes it flags.
        score, threshold, score_name: its statistic (the largest over classes), the value above
            which it flags, and what the statistic is.
        candidate: the most suspicious class (flagged or not; None if the scanner ranks none).
        proxy_asr: the share of held-out clean images of other classes that the candidate's
            reversed trigger sends to it (None without clean data or a reversed trigger).
        held_out: the clean images ``proxy_asr`` is measured on.
        seconds: the verdict's wall time.
    """

    scanner: str
    suspected: bool
    classes: tuple[int, ...]
    score: float | None
    threshold: float | None
    score_name: str
    candidate: int | None
    proxy_asr: float | None
    held_out: int
    seconds: float

    def record(self) -> dict[str, Any]:
        """The verdict as plain JSON values."""
        out = asdict(self)
        out["classes"] = list(self.classes)
        return out

    def line(self) -> str:
        """The verdict in one line, as ``goodnet repair`` prints it."""
        statistic = "" if self.score is None else \
            f"largest {self.score_name} {self.score:.2f}, threshold {self.threshold:g}"
        if self.suspected:
            flagged = ", ".join(str(k) for k in self.classes)
            return (f"verdict ({self.scanner}): a backdoor is still suspected in the repaired "
                    f"model, class {flagged} ({statistic})")
        return (f"verdict ({self.scanner}): no backdoor found in the repaired model "
                f"({statistic})")


def verdict_scanner(choice: str, clean: ImageData | None, classes: int) -> str | None:
    """The scanner a verdict runs for ``choice``: a scanner's name, ``"none"`` (None), or
    ``"auto"``: the default scanner for the data given, on a model of at most
    :data:`MAX_AUTO_CLASSES` classes (None above)."""
    if choice == NONE:
        return None
    if choice == AUTO:
        return default_scanner(clean) if classes <= MAX_AUTO_CLASSES else None
    make_scanner(choice)  # an unknown name fails now, before the repair
    return choice


def judge(model: nn.Module, clean: ImageData | None, *, scanner: str | None = None,
          seed: int = 0, progress: bool = False) -> Verdict:
    """Scan the repaired ``model`` (not modified) with ``scanner`` (default: the default
    scanner for the data given) and measure the proxy ASR on held-out clean images."""
    start = time.perf_counter()
    name = scanner or default_scanner(clean)
    method = make_scanner(name)
    fit, held = clean, None
    if clean is not None and method.needs_clean:
        held, fit = split_clean(clean, max(1, round(HELD_OUT * len(clean))), seed=seed)
    report = method.scan(model, fit if method.needs_clean else None, progress=progress)
    candidate = _candidate(report)
    proxy = None
    triggers = report.verdict.triggers
    if held is not None and candidate is not None and candidate < len(triggers):
        proxy = proxy_asr(model, held, triggers[candidate])
    return Verdict(
        scanner=name, suspected=report.backdoored, classes=report.targets,
        score=_finite(report.verdict.score), threshold=_finite(report.verdict.threshold),
        score_name=report.score_name, candidate=candidate, proxy_asr=proxy,
        held_out=0 if held is None else len(held), seconds=time.perf_counter() - start)


def _candidate(report: ScanReport) -> int | None:
    """The most suspicious class: the flagged one with the largest statistic, else the class
    with the largest statistic; None if the scanner gives no statistic per class."""
    scores = torch.tensor(report.verdict.scores, dtype=torch.float64)
    if scores.numel() == 0:
        return report.targets[0] if report.targets else None
    scores = torch.where(torch.isnan(scores), torch.tensor(-math.inf, dtype=torch.float64),
                         scores)
    if report.targets:
        return max(report.targets, key=lambda k: float(scores[k]))
    return int(torch.argmax(scores))


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
