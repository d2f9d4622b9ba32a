"""The input-level detectors' part of a benchmark (issue 18): what a GoodNet built from one or
more detectors catches at the false-alarm rate its user sets.

A detector cell stores three lists of scores (the calibration images', the clean test images'
and their triggered copies', all from the model's own seed split), so that a *combination* of
detectors can be measured without running anything again: :func:`screen_figures` applies a
GoodNet's own rule (:func:`goodnet.detector.calibrated_screens`): each of ``k`` detectors is
calibrated at ``rate / k`` on its calibration scores, and an input is answered N when any
detector passes its threshold. A single detector is a combination of one.

Per data set, architecture and candidate (every detector of the results, and every combination
of two or three of those run at their default settings), the table gives the mean AUROC (single
detectors), the mean detection rate at each requested false-alarm rate, the false-alarm rate
measured on the clean test images (mean and largest), how many models reach the issue's target
(detection ≥ 95 % at a measured false-alarm rate ≤ 1 %, at 1 % requested) and the time per input.
:func:`choose_default` is the rule BENCHMARKS.md wrote down before the grid ran.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from goodnet.bench.figures import save_figure
from goodnet.bench.grid import Entry, normal
from goodnet.detectors import DETECTORS, calibrate
from goodnet.errors import GoodnetError

TARGET_DETECTION = 0.95
TARGET_RATE = 0.01  # the requested (and largest measured) false-alarm rate of the target
MAX_COMBINED = 3  # the largest combination the report measures
SEPARATOR = "+"

Scores = tuple[Sequence[float], Sequence[float], Sequence[float]]  # calibration, clean, triggered


def rate_key(rate: float) -> str:
    """How a rate names its figures in a record: ``0.01`` → ``"0.01"``."""
    return f"{rate:g}"


def screen_figures(members: Sequence[Scores], rates: Sequence[float],
                   fired: Sequence[int] | None = None) -> dict[str, dict[str, float | None]]:
    """Detection and measured false-alarm rate of a GoodNet that combines ``members`` (each its
    calibration, clean and triggered scores), per requested rate: each member calibrated at
    ``rate / len(members)``; None where the calibration images are too few for that share.
    With ``fired`` (1 for each triggered input the backdoored model sends to its target), also
    ``working``: the detection rate among those."""
    out: dict[str, dict[str, float | None]] = {"detection": {}, "false_alarm": {},
                                               "working": {}}
    clean = [torch.as_tensor(m[1], dtype=torch.float64) for m in members]
    triggered = [torch.as_tensor(m[2], dtype=torch.float64) for m in members]
    if len({len(c) for c in clean}) > 1 or len({len(t) for t in triggered}) > 1:
        raise GoodnetError("detectors scored different test images; cannot combine them")
    for rate in rates:
        key = rate_key(rate)
        try:
            thresholds = [calibrate(torch.as_tensor(m[0], dtype=torch.float64),
                                    rate / len(members))
                          for m in members]
        except GoodnetError:
            out["detection"][key] = out["false_alarm"][key] = out["working"][key] = None
            continue
        out["false_alarm"][key] = _any_share(clean, thresholds)
        out["detection"][key] = _any_share(triggered, thresholds)
        out["working"][key] = None
        if fired is not None and len(fired) == len(triggered[0]) and any(fired):
            working = torch.as_tensor(fired, dtype=torch.bool)
            out["working"][key] = _any_share([t[working] for t in triggered], thresholds)
    return out


def _any_share(scores: list[torch.Tensor], thresholds: list[float]) -> float | None:
    """The share of inputs above their threshold under any member (None for no inputs)."""
    flagged = torch.zeros(len(scores[0]), dtype=torch.bool)
    for s, t in zip(scores, thresholds, strict=True):
        flagged |= s > t
    return float(flagged.double().mean()) if len(flagged) else None


def detect_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "detect" and r.get("status") == "ok"]


def _scores(record: dict[str, Any]) -> Scores:
    s = record["scores"]
    return s["calibration"], s["clean"], s["triggered"]


def at_defaults(record: dict[str, Any]) -> bool:
    """Whether a detector record ran its detector at the default settings."""
    config = record.get("config")
    if not isinstance(config, dict):
        return False
    name = config.get("detector")
    if name not in DETECTORS:
        return False
    default = Entry(name, name).resolved(DETECTORS, "detector")
    return bool(normal(config.get("detector_settings")) == normal(default))


class Candidate(NamedTuple):
    """One GoodNet's detectors on one model: its figures per requested rate."""

    label: str
    members: tuple[str, ...]
    data: str
    arch: str
    attack: str
    seed: int
    auroc: float | None
    detection: dict[str, float | None]
    false_alarm: dict[str, float | None]
    ms_per_input: float
    working: dict[str, float | None]


def candidates(records: list[dict[str, Any]]) -> list[Candidate]:
    """Every detector of ``records`` on its model, and every combination of two to
    ``MAX_COMBINED`` detectors run at their defaults on the same model."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in detect_records(records):
        groups[(r["data"], r["arch"], r["attack"], r["seed"])][r["detector"]] = r
    out = []
    for (data, arch, attack, seed), by_label in sorted(groups.items()):
        wanted = sorted({float(k) for r in by_label.values() for k in r["detection"]})
        # the backdoored model's answers are the same in every record of the model that has them
        fired = next((r["fired"] for r in by_label.values() if r.get("fired") is not None),
                     None)
        for label, r in sorted(by_label.items()):  # from the scores, as the combinations
            figures = screen_figures([_scores(r)], wanted, fired)
            out.append(Candidate(label, (label,), data, arch, attack, seed, r.get("auroc"),
                                 figures["detection"], figures["false_alarm"],
                                 r["ms_per_input"], figures["working"]))
        defaults = sorted(label for label, r in by_label.items() if at_defaults(r))
        for size in range(2, min(MAX_COMBINED, len(defaults)) + 1):
            for members in itertools.combinations(defaults, size):
                rs = [by_label[m] for m in members]
                try:
                    figures = screen_figures([_scores(r) for r in rs], wanted, fired)
                except GoodnetError:  # scored on other test images (another test_limit)
                    continue
                out.append(Candidate(SEPARATOR.join(members), members, data, arch, attack, seed,
                                     None, figures["detection"], figures["false_alarm"],
                                     sum(r["ms_per_input"] for r in rs), figures["working"]))
    return out


def reaches_target(c: Candidate) -> bool:
    detection = c.detection.get(rate_key(TARGET_RATE))
    false_alarm = c.false_alarm.get(rate_key(TARGET_RATE))
    return (detection is not None and false_alarm is not None
            and detection >= TARGET_DETECTION and false_alarm <= TARGET_RATE)


class DetectRow(NamedTuple):
    label: str
    data: str
    arch: str
    models: int
    auroc: float | None
    detection: dict[str, float | None]
    false_alarm: dict[str, float | None]
    false_alarm_max: dict[str, float | None]
    on_target: int
    ms_per_input: float
    working: dict[str, float | None]  # mean over the models with the backdoored model's answers


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else \
        statistics.fmean(v for v in values if v is not None)


def detect_rows(records: list[dict[str, Any]]) -> list[DetectRow]:
    groups: dict[tuple[str, str, str], list[Candidate]] = defaultdict(list)
    for c in candidates(records):
        groups[(c.data, c.arch, c.label)].append(c)
    rows = []
    for (data, arch, label), group in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], len(kv[1][0].members), kv[0][2])):
        rates = sorted({k for c in group for k in c.detection}, key=float)
        rows.append(DetectRow(
            label, data, arch, len(group), _mean([c.auroc for c in group]),
            {k: _mean([c.detection.get(k) for c in group]) for k in rates},
            {k: _mean([c.false_alarm.get(k) for c in group]) for k in rates},
            {k: (None if any(c.false_alarm.get(k) is None for c in group)
                 else max(c.false_alarm[k] or 0.0 for c in group)) for k in rates},
            sum(reaches_target(c) for c in group),
            statistics.fmean(c.ms_per_input for c in group),
            {k: _mean([c.working[k] for c in group if c.working.get(k) is not None] or [None])
             for k in rates}))
    return rows


def choose_default(records: list[dict[str, Any]]) -> list[tuple[str, int, float, float]]:
    """The candidates at default settings ranked by the rule written in BENCHMARKS.md before
    the grid ran: most models on target (detection ≥ 95 % at a measured false-alarm rate ≤ 1 %,
    1 % requested), then the higher mean detection at 1 %, then the fewer ms per input. Every
    candidate is judged on every model of ``records`` (pass the rule's: seed 0, the small CNN):
    a model a candidate has no figure for (a failed cell, a combination the calibration images
    cannot calibrate) counts as off target with no detection. Each entry: (label, models on
    target, mean detection at 1 %, ms per input); the first is the default."""
    found = detect_records(records)
    defaults = {r["detector"] for r in found if at_defaults(r)}
    models = {(r["data"], r["arch"], r["attack"], r["seed"]) for r in found}
    pooled: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates(records):
        if set(c.members) <= defaults:
            pooled[c.label].append(c)
    ranked = []
    key = rate_key(TARGET_RATE)
    for label, group in pooled.items():
        detections = [c.detection.get(key) for c in group]
        detection = sum(d or 0.0 for d in detections) / len(models)
        ranked.append((label, sum(map(reaches_target, group)), detection,
                       statistics.fmean(c.ms_per_input for c in group)))
    return sorted(ranked, key=lambda r: (-r[1], -r[2], r[3]))


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def detect_markdown(records: list[dict[str, Any]]) -> str:
    rows = detect_rows(records)
    if not rows:
        return ""
    rates = sorted({k for r in rows for k in r.detection}, key=float)
    head = ["detectors", "data", "arch", "models", "AUROC"]
    for k in rates:
        head += [f"detection at {100 * float(k):g} % (%)",
                 f"working triggers detected at {100 * float(k):g} % (%)",
                 f"FA measured at {100 * float(k):g} % (%, mean / max)"]
    head += ["on target", "ms per input"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, r.data, r.arch, str(r.models),
                 "–" if r.auroc is None else f"{r.auroc:.3f}"]
        for k in rates:
            cells += [_pct(r.detection.get(k)), _pct(r.working.get(k)),
                      f"{_pct(r.false_alarm.get(k), 2)} / {_pct(r.false_alarm_max.get(k), 2)}"]
        cells += [f"{r.on_target} / {r.models}", f"{r.ms_per_input:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_detection(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Detection at the lowest requested false-alarm rate, per attack: one panel per data set,
    one line per single detector and one for the GoodNet the rule chooses."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    found = candidates(records)
    if not found:
        return None
    ranking = choose_default(records)
    chosen = ranking[0][0] if ranking else None
    shown = [c for c in found if len(c.members) == 1 or c.label == chosen]
    rate = min((k for c in shown for k in c.detection), key=float)
    panels: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for c in shown:
        value = c.detection.get(rate)
        if value is not None:
            panels[f"{c.data} {c.arch}"][c.label][c.attack].append(value)
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.0), dpi=100,
                                squeeze=False)
    for ax, (title, lines) in zip(axes[0], sorted(panels.items()), strict=True):
        attacks = sorted({a for line in lines.values() for a in line})
        for label, values in sorted(lines.items()):
            ys = [100 * statistics.fmean(values[a]) if values.get(a) else math.nan
                  for a in attacks]
            ax.plot(range(len(attacks)), ys, marker="o", linewidth=1.8 if label == chosen
                    else 0.9, label=label + (" (chosen)" if label == chosen else ""))
        ax.axhline(100 * TARGET_DETECTION, color="#bbb", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(-3, 103)
        ax.set_ylabel(f"detection at {100 * float(rate):g} % requested false alarms (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path, plt)
