"""The report of a benchmark: tables, CSV, plots and one self-contained HTML page.

From a results file (the last record of each cell; failed cells listed apart), :func:`write_report`
writes into a folder:

- ``report.md``: per data set, architecture and attack, the backdoored model's CA / ASR and each
  defense's, mean ± std over seeds (n seeds in brackets when they differ). A defense that
  *repaired* the row is marked ✓ (bold): mean ASR at most ``max_asr`` (2 %) with mean CA at most
  ``tolerance`` (1 point) below the backdoored model's, the target of issues 16 and 29; a
  defense that did not is not marked, whatever else it did. Among those that repaired, the
  lowest mean ASR is marked ★; none when no defense repaired. The last line counts the rows
  each defense repaired. With verdicts in the records (a grid's ``verdict`` key), a second table
  sets the verdict on each repaired model against its measured ASR.
- ``summary.csv`` (one row per data set, architecture, attack and defense: means, standard
  deviations, counts, ``best`` and ``repaired``) and ``cells.csv`` (one row per cell, with
  whether that cell repaired its model and its verdict).
- ``scatter.png``: CA against ASR, one panel per defense, one point per cell.
- ``curves-<defense>.png``: test CA and ASR along each defense's pruning curve (first seed).
- ``report.html``: all of the above in one file, images inlined, nothing fetched.

The tables hold every record; the plots hold the first ``MAX_PLOTTED`` defenses (a panel and a
curve figure each) and the first ``MAX_LINES`` attacks in a legend or lines in a curve figure,
and say so when there are more: drawing costs far more than tabulating, and hundreds of panels
help no reader. So the time a report takes grows linearly with its results file.

When the results folder has the runner's log (``runs.jsonl``), the report also states the wall
time ``goodnet bench`` spent on the folder (every sitting summed), the executor and the machine.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from goodnet.artifacts import write_text_atomic
from goodnet.bench.detect_report import choose_default, detect_markdown, plot_detection
from goodnet.bench.figures import save_figure
from goodnet.bench.results import (
    RESULTS,
    RUNS,
    in_range,
    latest,
    pruned_count,
    read_records,
    read_runs,
)
from goodnet.bench.scan_report import plot_roc, scan_markdown
from goodnet.defenses.base import AXES, Curve
from goodnet.errors import GoodnetError

METRICS = (("clean_accuracy", "CA"), ("attack_success_rate", "ASR"),
           ("robust_accuracy", "RA"))
MAX_ASR = 0.02  # a repaired model's ASR at most (issues 16 and 29)
MAX_DROP = 0.01  # and its CA at most this far below the backdoored model's
MAX_PLOTTED = 9  # defenses plotted (3 × 3 panels, and a curve figure each)
MAX_LINES = 20  # attacks named in the scatter's legend, lines per curve figure (tab20's colours)
_MAX_X = 1e15


def _values(rows: list[dict], part: str, key: str) -> list[float]:
    out = []
    for row in rows:
        value = (row.get(part) or {}).get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out.append(float(value))
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def _fmt(values: list[float], n: int | None = None) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    text = f"{100 * mean:.1f}" if len(values) == 1 else f"{100 * mean:.1f} ± {100 * std:.1f}"
    return text + (f" (n={len(values)})" if n is not None and len(values) != n else "")


class Report:
    """The successful records of a results file, grouped for tabulation."""

    def __init__(self, records: list[dict[str, Any]], tolerance: float = MAX_DROP,
                 keys: set[str] | None = None, max_asr: float = MAX_ASR) -> None:
        kept = list(latest(records).values())
        if keys is not None:  # only the cells of the current grid
            kept = [r for r in kept if r["key"] in keys]
        self.scans = [r for r in kept if r.get("kind") == "scan"]  # tabulated apart
        self.detects = [r for r in kept if r.get("kind") == "detect"]
        kept = [r for r in kept if r.get("kind") not in ("scan", "detect")]
        # One record per data set, architecture, attack, defense and seed: the last one written
        # (a grid edited between runs leaves its older settings' records behind).
        kept = list({(r.get("data"), r.get("arch"), r.get("attack"), r.get("defense"),
                      r.get("seed")): r for r in kept}.values())
        self.ok = [r for r in kept if r.get("status") == "ok"]
        self.failed = [r for r in kept if r.get("status") != "ok"]
        self.tolerance, self.max_asr = tolerance, max_asr
        self._backdoored: dict[tuple, list[dict]] = {}  # computed once per row
        self._repaired: dict[tuple, bool] = {}
        self.defenses = list(dict.fromkeys(r["defense"] for r in self.ok))
        self.seeds = sorted({r["seed"] for r in self.ok})
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.ok:
            groups[(r["data"], r["arch"], r["attack"], r["defense"])].append(r)
        self.groups = groups
        self.rows = sorted({k[:3] for k in groups})

    def backdoored(self, row: tuple) -> list[dict]:
        """One record per seed of the model before repair (any defense's copy of it)."""
        if row not in self._backdoored:
            self._backdoored[row] = self._find_backdoored(row)
        return self._backdoored[row]

    def _find_backdoored(self, row: tuple) -> list[dict]:
        per_seed: dict[Any, dict] = {}
        for defense in self.defenses:
            for r in self.groups.get((*row, defense), []):
                per_seed.setdefault(r["seed"], r)
        return list(per_seed.values())

    def repaired(self, row: tuple, defense: str) -> bool:
        """Whether ``defense`` repaired the row: mean ASR at most ``max_asr`` and mean CA at most
        ``tolerance`` below the backdoored model's."""
        key = (*row, defense)
        if key not in self._repaired:
            base = _mean_std(_values(self.backdoored(row), "before", "clean_accuracy"))[0]
            rows = self.groups.get(key, [])
            ca = _mean_std(_values(rows, "after", "clean_accuracy"))[0]
            asr = _mean_std(_values(rows, "after", "attack_success_rate"))[0]
            self._repaired[key] = is_repaired(base, ca, asr, self.tolerance, self.max_asr)
        return self._repaired[key]

    def best(self, row: tuple) -> str | None:
        """The defense with the lowest mean ASR among those that repaired the row (ties: the
        higher CA); None when none did."""
        candidates = []
        for defense in self.defenses:
            if self.repaired(row, defense):
                rows = self.groups.get((*row, defense), [])
                candidates.append((_mean_std(_values(rows, "after", "attack_success_rate"))[0],
                                   -_mean_std(_values(rows, "after", "clean_accuracy"))[0],
                                   defense))
        return min(candidates)[2] if candidates else None

    def markdown(self) -> str:
        n = len(self.seeds)
        head = ["data", "arch", "attack", "backdoored", *self.defenses]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            before = self.backdoored(row)
            cells = [f"{_fmt(_values(before, 'before', 'clean_accuracy'), n)} / "
                     f"{_fmt(_values(before, 'before', 'attack_success_rate'), n)}"]
            best = self.best(row)
            for defense in self.defenses:
                rows = self.groups.get((*row, defense), [])
                if not rows:
                    cells.append("–")
                    continue
                text = (f"{_fmt(_values(rows, 'after', 'clean_accuracy'), n)} / "
                        f"{_fmt(_values(rows, 'after', 'attack_success_rate'), n)}")
                if self.repaired(row, defense):
                    text = f"**{text}** ✓" + (" ★" if defense == best else "")
                cells.append(text)
            lines.append("| " + " | ".join([*row, *cells]) + " |")
        counts = [f"{sum(self.repaired(row, d) for row in self.rows)} of "
                  f"{sum(bool(self.groups.get((*row, d))) for row in self.rows)}"
                  for d in self.defenses]
        lines.append("| repaired ✓ | | | | " + " | ".join(counts) + " |")
        return "\n".join(lines)

    def summary_rows(self) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            best = self.best(row)
            for defense in ["(backdoored)", *self.defenses]:
                rows = self.backdoored(row) if defense == "(backdoored)" else \
                    self.groups.get((*row, defense), [])
                if not rows:
                    continue
                part = "before" if defense == "(backdoored)" else "after"
                entry: dict[str, Any] = dict(zip(("data", "arch", "attack"), row, strict=True))
                entry.update(defense=defense, seeds=len(rows))
                for key, label in METRICS:
                    mean, std = _mean_std(_values(rows, part, key))
                    entry[f"{label}_mean"], entry[f"{label}_std"] = mean, std
                seconds = [r["repair_seconds"] for r in rows if r.get("repair_seconds")]
                entry["repair_seconds_median"] = statistics.median(seconds) if seconds and \
                    part == "after" else math.nan
                memory = [r["peak_memory_mib"] for r in rows if r.get("peak_memory_mib")]
                entry["peak_memory_mib_max"] = max(memory) if memory and part == "after" \
                    else math.nan
                entry["best"] = defense == best
                entry["repaired"] = defense != "(backdoored)" and self.repaired(row, defense)
                out.append(entry)
        return out

    def cell_rows(self) -> list[dict[str, Any]]:
        out = []
        for r in sorted(self.ok + self.failed, key=lambda r: (
                r["data"], r["arch"], r["attack"], r["defense"], r["seed"])):
            entry = {k: r.get(k) for k in ("data", "arch", "attack", "defense", "seed",
                                           "status", "chosen", "pruned", "repair_seconds",
                                           "peak_memory_mib", "error", "key")}
            entry["pruned"] = pruned_count(r)
            before, after = r.get("before") or {}, r.get("after") or {}
            entry["repaired"] = is_repaired(
                before.get("clean_accuracy"), after.get("clean_accuracy"),
                after.get("attack_success_rate"), self.tolerance, self.max_asr)
            verdict = r.get("verdict") or {}
            entry["verdict_suspected"] = verdict.get("suspected")
            entry["verdict_proxy_asr"] = verdict.get("proxy_asr")
            for part in ("before", "after", "goodnet"):
                for key, label in (*METRICS, ("detection_rate", "detected"),
                                   ("false_alarm_rate", "false_alarm")):
                    if part != "goodnet" and label in ("detected", "false_alarm"):
                        continue
                    entry[f"{part}_{label}"] = (r.get(part) or {}).get(key)
            out.append(entry)
        return out


BANDS = ("ASR ≤ 2 %", "2-10 %", "> 10 %")  # the verdict table's columns


def verdict_markdown(records: list[dict[str, Any]], max_asr: float = MAX_ASR) -> str:
    """The verdicts on the repaired models against their measured ASR: a table of counts, how
    often the verdict was right (suspected where ASR > ``max_asr``, not where it is at most),
    and how often it found nothing where ASR stayed above 10 %. Empty without verdicts."""
    judged: list[tuple[bool, float]] = []
    for r in records:
        asr = (r.get("after") or {}).get("attack_success_rate")
        if isinstance(r.get("verdict"), dict) and isinstance(asr, int | float):
            judged.append((bool(r["verdict"].get("suspected")), float(asr)))
    if not judged:
        return ""

    def band(asr: float) -> int:
        return 0 if asr <= max_asr + 1e-12 else 1 if asr <= 0.10 else 2

    lines = ["Verdict on each repaired model (goodnet.verdict) against its measured ASR, cells:",
             "", "| verdict | " + " | ".join(BANDS) + " |",
             "|---|---|---|---|"]
    for suspected, name in ((True, "suspected"), (False, "not found")):
        counts = [sum(s == suspected and band(a) == i for s, a in judged) for i in range(3)]
        lines.append(f"| {name} | " + " | ".join(map(str, counts)) + " |")
    right = sum(s == (band(a) > 0) for s, a in judged)
    missed = sum(not s and band(a) == 2 for s, a in judged)
    lines += ["", f"Right on {right} of {len(judged)} cells; \"not found\" where ASR stayed "
                  f"above 10 %: {missed}."]
    return "\n".join(lines)


def is_repaired(before_ca: Any, ca: Any, asr: Any, tolerance: float = MAX_DROP,
                max_asr: float = MAX_ASR) -> bool:
    """Whether a repair reached the target: ASR at most ``max_asr`` with CA at most
    ``tolerance`` below ``before_ca`` (False where a figure is missing)."""
    values = (before_ca, ca, asr)
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        return False
    return bool(asr <= max_asr + 1e-12 and ca >= before_ca - tolerance - 1e-12)


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


class Panel(NamedTuple):
    """One defense's scatter panel: (attack, ASR %, CA %) after and before repair."""

    defense: str
    after: list[tuple[str, float, float]]
    before: list[tuple[str, float, float]]


def scatter_panels(report: Report) -> list[Panel]:
    """The points of the scatter plot, for the first ``MAX_PLOTTED`` defenses."""
    panels = []
    for defense in report.defenses[:MAX_PLOTTED]:
        panel = Panel(defense, [], [])
        for row in report.rows:
            rows = report.groups.get((*row, defense), [])
            for part, points in (("after", panel.after), ("before", panel.before)):
                for r in rows:
                    ca = _values([r], part, "clean_accuracy")
                    asr = _values([r], part, "attack_success_rate")
                    if ca and asr:
                        points.append((row[2], 100 * asr[0], 100 * ca[0]))
        panels.append(panel)
    return panels


def plot_scatter(report: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    panels = scatter_panels(report)
    k = max(1, len(panels))
    cols = min(3, k)
    figure, axes = plt.subplots((k + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.4 * (
        (k + cols - 1) // cols)), dpi=100, squeeze=False, sharey=True)
    lowest = min([p[2] for panel in panels for p in panel.after + panel.before], default=0.0)
    attacks = sorted({r[2] for r in report.rows})
    palette = plt.get_cmap("tab10" if len(attacks) <= 10 else "tab20")
    colours = {a: palette(i % palette.N) for i, a in enumerate(attacks)}
    for index, panel in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for points, marker, alpha in ((panel.after, "o", 0.8), (panel.before, "x", 0.5)):
            if points:  # one call per panel and kind, whatever the number of attacks
                ax.scatter([p[1] for p in points], [p[2] for p in points], s=14, marker=marker,
                           color=[colours[p[0]] for p in points], alpha=alpha)
        ax.set_title(f"{panel.defense} (x: before repair)", fontsize=10)
        ax.set_xlabel("ASR %")
        ax.set_ylabel("CA %")
        ax.set_xlim(-3, 103)
        ax.set_ylim(max(0.0, lowest - 2), 100.5)
        ax.grid(alpha=0.3)
    for index in range(len(panels), axes.size):
        axes[index // cols][index % cols].axis("off")
    labels = attacks[:MAX_LINES]
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[a]) for a in labels]
    if len(attacks) > MAX_LINES:
        labels.append(f"... {len(attacks) - MAX_LINES} more")
        handles.append(Line2D([], [], linestyle=""))
    if handles:
        figure.legend(handles, labels, loc="center left", fontsize=7,
                      bbox_to_anchor=(1.0, 0.5))  # beside the panels, never over one
    return save_figure(figure, path, plt)


class CurveLine(NamedTuple):
    """One (data, arch, attack)'s curve under a defense, first seed: x, test CA %, ASR %."""

    label: str
    x_key: str
    xs: list[float]
    ca: list[float]
    asr: list[float]


def curve_lines(report: Report, defense: str, limit: int = MAX_LINES) -> list[CurveLine]:
    """The lines of ``defense``'s curve figure: the first ``limit`` (data, arch, attack) with a
    curve, each over its sweep's points whose x, test CA and test ASR are numbers (x: the
    round for a defense that goes by rounds, else the channels pruned)."""
    lines = []
    for row in report.rows:
        rows = sorted(report.groups.get((*row, defense), []), key=lambda r: r["seed"])
        if not rows:
            continue
        curve = Curve.from_records(rows[0].get("curve"), rows[0].get("curve_axis"))
        x_key = curve.axis if curve.by_step else "pruned"
        kept: list[tuple[float, float, float]] = []
        for p in curve.sweep():
            x = curve.position(p)
            if x is not None and p.test_ca is not None and p.test_asr is not None and \
                    in_range(x, -_MAX_X, _MAX_X) and in_range(p.test_ca, 0, 1) and \
                    in_range(p.test_asr, 0, 1):
                kept.append((float(x), p.test_ca, p.test_asr))
        if kept:
            lines.append(CurveLine(" ".join(row), x_key, [x for x, _, _ in kept],
                                   [100.0 * ca for _, ca, _ in kept],
                                   [100.0 * asr for _, _, asr in kept]))
            if len(lines) == limit:
                break
    return lines


def plot_curves(report: Report, defense: str, path: Path) -> Path | None:
    """Test CA and ASR along the defense's curve, one line per (data, arch, attack), first seed."""
    lines = curve_lines(report, defense, MAX_LINES + 1)
    more, lines = len(lines) > MAX_LINES, lines[:MAX_LINES]
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for line in lines:
        left.plot(line.xs, line.ca, label=line.label, linewidth=1)
        right.plot(line.xs, line.asr, label=line.label, linewidth=1)
    x_name = AXES[lines[0].x_key]
    for ax, name in ((left, "test CA %"), (right, "test ASR %")):
        ax.set_xlabel(x_name)
        ax.set_ylabel(name)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    right.legend(fontsize=6, loc="best")
    figure.suptitle(f"{defense}: along its curve (first seed; evaluation only"
                    f"{f'; the first {MAX_LINES} attacks' if more else ''})", fontsize=10)
    return save_figure(figure, path, plt)


def _file_names(labels: list[str], prefix: str) -> dict[str, str]:
    """A short, distinct file name for each label (its safe characters, at most 60)."""
    names: dict[str, str] = {}
    for label in labels:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)[:60]
        name, n = f"{prefix}{safe}.png", 1
        while name in names.values():
            n += 1
            name = f"{prefix}{safe}-{n}.png"
        names[label] = name
    return names


def describe_runs(runs: list[dict[str, Any]]) -> str:
    """One sentence on the runs logged for a results folder: wall time, executor, machine."""
    if not runs:
        return ""
    seconds = sum(r["seconds"] for r in runs)
    executors = sorted({f"{r.get('executor', '?')}, {r.get('workers', '?')} workers, "
                        f"{r.get('threads', '?')} thread(s) per task" for r in runs})
    machines = []
    for r in runs:
        m = r.get("machine") or {}
        text = (f"{m.get('host', '?')} ({m.get('cpus', '?')} × {m.get('cpu', '?')}, "
                f"{m.get('memory_gib', '?')} GiB" + (f", {m['gpu']}" if m.get("gpu") else
                                                    ", no GPU") + ")")
        if text not in machines:
            machines.append(text)
    interrupted = sum(r.get("outcome") != "finished" for r in runs)
    return (f"Wall time: {seconds / 60:.1f} min in {len(runs)} run(s) of `goodnet bench`"
            + (f" ({interrupted} interrupted)" if interrupted else "")
            + f", first started {min(r['started'] for r in runs)}; executor "
            f"{'; '.join(executors)}; machine {'; '.join(machines)}.")


def _html_table(markdown: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines()
            if not line.startswith("|---")]
    out = ["<table>"]
    for i, cells in enumerate(rows):
        tag = "th" if i == 0 else "td"
        parts = []
        for cell in cells:
            text = cell.strip()
            best = text.startswith("**")
            text = html.escape(text.replace("**", ""))
            attribute = ' class="best"' if best else ""
            parts.append(f"<{tag}{attribute}>{text}</{tag}>")
        out.append("<tr>" + "".join(parts) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def write_report(results: str | Path, out: str | Path, *, tolerance: float = MAX_DROP,
                 title: str | None = None, note: str = "", keys: set[str] | None = None
                 ) -> list[Path]:
    """Write the report of ``results`` into ``out`` (only the cells in ``keys``, if given: a
    grid's current cells); returns the paths written."""
    results, out = Path(results), Path(out)
    if results.is_dir():
        results = results / RESULTS
    if not results.exists():
        raise GoodnetError(f"{results}: no such results file")
    report = Report(read_records(results), tolerance, keys)
    if not report.ok and not report.failed and not report.scans and not report.detects:
        raise GoodnetError(f"{results}: no result records in it")
    title = title or f"goodnet benchmark: {results.parent.name}"
    markdown = report.markdown()
    facts = _facts(report, results, tolerance)
    failures = _failures(report)
    scans, detects = _scans_section(report), _detects_section(report)
    if not report.ok:
        markdown = ""
    verdicts = verdict_markdown(report.ok, report.max_asr)
    text = "\n\n".join(filter(None, [f"# {title}", note, facts, markdown, verdicts, scans,
                                     detects,
                                     "Failed cells:\n" + "\n".join(failures)
                                     if failures else ""])) + "\n"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GoodnetError(f"cannot write {out}: {error.strerror or error}") from None
    written = _write_tables(report, out, text)
    images = _plot(report, out)
    written += [path for _, path in images]
    write_text_atomic(out / "report.html", _html_page(report, title, note, facts, markdown,
                                                      failures, images,
                                                      bool(scans), bool(detects)))
    written.append(out / "report.html")
    return written


def _facts(report: Report, results: Path, tolerance: float) -> str:
    """The paragraph under the title: the runs, the cells, their time, what the tables show."""
    seconds = sum((r.get("repair_seconds") or 0) + (r.get("measure_seconds") or 0)
                  for r in report.ok)
    hosts = sorted({r.get("host") or "?" for r in report.ok})
    version = sorted({(r.get("versions") or {}).get("goodnet", "?") for r in report.ok})
    facts = (f"{len(report.ok)} cells ({len(report.failed)} failed), seeds "
             f"{', '.join(map(str, report.seeds))}; cell time {seconds / 60:.1f} min (repair "
             f"and measurement, summed); host {', '.join(hosts)}; goodnet {', '.join(version)}. "
             f"CA / ASR in %, mean ± std over seeds; ✓ repaired: mean ASR at most "
             f"{100 * report.max_asr:g} % at most {100 * tolerance:g} point(s) below the "
             f"backdoored model's CA; ★ the lowest ASR among them.")
    if not report.ok and not report.failed:  # a grid of scans or detectors only
        facts = ""
    facts = " ".join(filter(None, [describe_runs(read_runs(results.parent / RUNS)),
                                   facts]))
    if report.scans:
        scanned = [r for r in report.scans if r.get("status") == "ok"]
        facts += (f" {len(scanned)} scan cells ({len(report.scans) - len(scanned)} failed), "
                  f"{sum(r.get('scan_seconds') or 0 for r in scanned) / 60:.1f} min of scans.")
    if report.detects:
        measured = [r for r in report.detects if r.get("status") == "ok"]
        facts += (f" {len(measured)} detector cells ({len(report.detects) - len(measured)} "
                  f"failed), {sum(r.get('detect_seconds') or 0 for r in measured) / 60:.1f} "
                  f"min of detection.")
    if len(report.defenses) > MAX_PLOTTED:
        facts += (f" The plots show the first {MAX_PLOTTED} of {len(report.defenses)} "
                  f"defenses; the tables show all.")
    return facts


def _method(r: dict[str, Any]) -> str:
    """What a cell ran: its defense, ``scan <scanner>`` or ``detect <detector>``."""
    if r.get("kind") == "scan":
        return f"scan {r.get('scanner')}"
    if r.get("kind") == "detect":
        return f"detect {r.get('detector')}"
    return str(r.get("defense"))


def _failures(report: Report) -> list[str]:
    """One Markdown list item per failed cell: repairs first, then scans and detectors."""
    return [f"- {r['data']} {r['arch']} {r['attack']} seed {r['seed']}, {_method(r)}: "
            f"{r.get('error')}" for r in report.failed + [
                r for r in report.scans + report.detects if r.get("status") != "ok"]]


def _scans_section(report: Report) -> str:
    """The Markdown section on the scanners, or "" when the results have no scan."""
    scans = scan_markdown(report.scans)
    if not scans:
        return scans
    return ("## Scanners\n\nBackdoored against clean models: AUROC of the model-level "
            "score, detection and false positives at each scanner's default threshold, "
            "the target named on the working all-to-one backdoors.\n\n" + scans)


def _detects_section(report: Report) -> str:
    """The Markdown section on the input detectors, or "" when the results have none."""
    detects = detect_markdown(report.detects)
    if not detects:
        return detects
    ranking = choose_default(report.detects)
    chosen = (f" By the rule of BENCHMARKS.md (most models on target, then mean detection "
              f"at 1 %, then time), the default GoodNet would be **{ranking[0][0]}**."
              if ranking else "")
    return ("## Input detectors\n\nEach row a GoodNet's checks: one detector, or several "
            "(a+b) each calibrated at the requested rate divided by their number, "
            "answering N when any fires. Detection: triggered test inputs answered N; "
            "working triggers: those of them the backdoored model sends to the target; FA: "
            "clean test inputs answered N, at each requested false-alarm rate; on "
            "target: models with detection ≥ 95 % at a measured false-alarm rate ≤ 1 % "
            f"(1 % requested).{chosen}\n\n" + detects)


def _write_tables(report: Report, out: Path, text: str) -> list[Path]:
    """``report.md`` (``text``), ``summary.csv`` and ``cells.csv``; returns their paths."""
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "summary.csv", _csv(report.summary_rows()))
    write_text_atomic(out / "cells.csv", _csv(report.cell_rows()))
    return [out / "report.md", out / "summary.csv", out / "cells.csv"]


def _plot(report: Report, out: Path) -> list[tuple[str, Path]]:
    """Draw the report's figures into ``out``; returns (caption, path) for each one drawn."""
    images = []
    if report.ok:
        images.append(("CA against ASR, per defense", plot_scatter(report, out / "scatter.png")))
        names = _file_names(report.defenses[:MAX_PLOTTED], "curves-")
        for defense, name in names.items():
            curve = plot_curves(report, defense, out / name)
            if curve is not None:
                images.append((f"{defense}: pruning curve", curve))
    roc = plot_roc(report.scans, out / "roc.png") if report.scans else None
    if roc is not None:
        images.append(("scanners: ROC, backdoored against clean models", roc))
    detection = plot_detection(report.detects, out / "detection.png") if report.detects \
        else None
    if detection is not None:
        images.append(("input detectors: detection at the lowest requested false-alarm rate",
                       detection))
    return images


def _html_page(report: Report, title: str, note: str, facts: str, markdown: str,
               failures: list[str], images: list[tuple[str, Path]], scans: bool,
               detects: bool) -> str:
    """``report.html``: the Markdown report's sections as HTML, the figures inlined."""
    figures = "\n".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)}'
        f"</figcaption></figure>" for caption, path in images)
    note_html = f"<p>{html.escape(note)}</p>" if note else ""
    failed_html = ("<h2>Failed cells</h2><ul>" + "".join(
        f"<li>{html.escape(f[2:])}</li>" for f in failures) + "</ul>") if failures else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }}
th {{ background: #f0f0f0; }}
td.best {{ background: #e3f4e3; font-weight: bold; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{note_html}
<p>{html.escape(facts)}</p>
{_html_table(markdown) if markdown else ""}
{"<h2>Scanners</h2>" + _html_table(scan_markdown(report.scans)) if scans else ""}
{"<h2>Input detectors</h2>" + _html_table(detect_markdown(report.detects)) if detects else ""}
{failed_html}
{figures}
</body></html>
"""
