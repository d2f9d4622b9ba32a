"""The scanners' part of a benchmark report: how well each scanner tells backdoored models from
clean ones.

Per scanner and data set (over every architecture and seed in the results): the AUROC of the
model-level score (higher = more suspicious; ties count half), the detection rate and the
false-positive rate at the scanner's own default threshold, the target class named correctly on
the all-to-one backdoors that work (ASR >= 90 % on the model's card), and the time per scan. The
ROC curves are plotted one panel per data set.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from goodnet.bench.figures import save_figure
from goodnet.metrics import auroc, roc_points

WORKING_BACKDOOR = 0.9  # an all-to-one backdoor counts for target accuracy at ASR >= 90 %


def _score(record: dict[str, Any]) -> float:
    """A record's score (infinities are stored as the strings "inf" and "-inf")."""
    return float(record["score"])


class ScanRow(NamedTuple):
    scanner: str
    data: str
    backdoored: int
    clean: int
    auroc: float
    detection: float
    false_positive: float
    false_positives: int
    target_correct: int
    target_total: int
    seconds_median: float
    seconds_max: float


def scan_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "scan" and r.get("status") == "ok"]


def scan_rows(records: list[dict[str, Any]]) -> list[ScanRow]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in scan_records(records):
        groups[(r["scanner"], r["data"])].append(r)
    rows = []
    for (scanner, data), group in sorted(groups.items()):
        bad = [r for r in group if r.get("backdoored_model")]
        good = [r for r in group if not r.get("backdoored_model")]
        working = [r for r in bad if r.get("all_to_one") and (
            (r.get("model_card") or {}).get("attack_success_rate") or 0) >= WORKING_BACKDOOR]
        correct = sum(1 for r in working
                      if r.get("targets") and r["targets"][0] in (r.get("true_targets") or []))
        seconds = [r["scan_seconds"] for r in group]
        false_positives = sum(bool(r.get("flagged")) for r in good)
        rows.append(ScanRow(
            scanner, data, len(bad), len(good),
            auroc([_score(r) for r in bad], [_score(r) for r in good]),
            sum(bool(r.get("flagged")) for r in bad) / len(bad) if bad else math.nan,
            false_positives / len(good) if good else math.nan, false_positives,
            correct, len(working), statistics.median(seconds), max(seconds)))
    return rows


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.0f} %"


def scan_markdown(records: list[dict[str, Any]]) -> str:
    rows = scan_rows(records)
    if not rows:
        return ""
    lines = ["| scanner | data | backdoored / clean models | AUROC | detected | false "
             "positives | target named (all-to-one, ASR ≥ 90 %) | scan s, median / max |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        roc = "–" if math.isnan(r.auroc) else f"{r.auroc:.3f}"
        target = f"{r.target_correct} / {r.target_total}" if r.target_total else "–"
        lines.append(f"| {r.scanner} | {r.data} | {r.backdoored} / {r.clean} | {roc} | "
                     f"{_pct(r.detection)} | {r.false_positives} ({_pct(r.false_positive)}) | "
                     f"{target} | {r.seconds_median:.1f} / {r.seconds_max:.1f} |")
    return "\n".join(lines)


def plot_roc(records: list[dict[str, Any]], path: Path) -> Path | None:
    """ROC curves, one panel per data set, one line per scanner; None without both kinds."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)
    for r in scan_records(records):
        bad, good = groups[r["data"]].setdefault(r["scanner"], ([], []))
        (bad if r.get("backdoored_model") else good).append(_score(r))
    panels = {data: {s: v for s, v in scanners.items() if v[0] and v[1]}
              for data, scanners in groups.items()}
    panels = {data: scanners for data, scanners in panels.items() if scanners}
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=100,
                                squeeze=False)
    for ax, (data, scanners) in zip(axes[0], sorted(panels.items()), strict=True):
        for scanner, (bad, good) in sorted(scanners.items()):
            points = roc_points(bad, good)
            ax.plot([p[0] for p in points], [p[1] for p in points], drawstyle="steps-post",
                    label=f"{scanner} (AUROC {auroc(bad, good):.2f})")
        ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8, linestyle="--")
        ax.set_title(f"{data} ({len(bad)} backdoored, {len(good)} clean)", fontsize=10)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("detection rate")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    return save_figure(figure, path, plt)
