"""A scan's files: what ``goodnet scan`` writes into its ``--out`` folder.

- ``scan.json``: the scanner, its settings, the verdict (backdoored, targets, the statistic, its
  name and threshold, the per-class statistic, each reversed trigger's norm and success), the
  model's class count, the clean images used, the time, goodnet's version, the model file's name
  and the files written.
- ``class-<k>.png`` for each flagged class, or for the most suspicious class (marked "not
  flagged") when none is: its reversed trigger (mask, pattern, mask × pattern, and a few clean
  images of other classes stamped with it, the model's answer in their titles), or the input the
  scanner optimised for the class (MM-BD's maximum-margin input).
- ``triggers.safetensors`` and ``triggers.png`` when the scanner reverse-engineers triggers
  (:mod:`goodnet.triggers`; ``load_triggers`` reads them back).
- ``scan.html``: all of it on one self-contained page (images embedded, no external resources).

The folder is built next to ``out`` and renamed into place, so an interrupted scan leaves no
half-written folder. Like ``goodnet repair``, an existing folder is written into: its files of
the same names are replaced (each atomically), and the class pictures a previous scan listed in
its ``scan.json`` are removed when this scan makes none of that name.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.methods import ReversedTrigger
from goodnet.models import model_device
from goodnet.scans.base import ScanReport
from goodnet.triggers import plot_triggers, save_triggers, verdict_summary
from goodnet.version import __version__

STAMPED = 4  # clean images shown stamped with each pictured trigger
TABLE_ROWS = 20  # classes listed in the page's table (the most suspicious first)


def check_out(out: Path) -> None:
    """Fail now, before a long scan and without creating anything, if ``out`` cannot become the
    scan's folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GoodnetError(f"cannot write {out}: it is a file, not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise GoodnetError(f"cannot write {out}: {existing} is not a folder goodnet can write in")


def scores_name(report: ScanReport) -> str:
    """What the per-class statistic is: the score's own name when the score is its maximum
    (Neural Cleanse's anomaly indices), else "per-class statistic" (MM-BD's per-class margins
    feed a test whose p-value is the score); the threshold applies to the score alone."""
    return report.score_name if _shared_scale(report) else "per-class statistic"


def _shared_scale(report: ScanReport) -> bool:
    scores = [s for s in report.verdict.scores if not math.isnan(s)]
    return bool(scores) and max(scores) == report.verdict.score


def pictured_classes(report: ScanReport) -> list[tuple[int, bool]]:
    """(class, flagged) for each class that gets a picture: the flagged ones, or else the one
    with the highest per-class statistic."""
    verdict = report.verdict
    if verdict.targets:
        return [(k, True) for k in verdict.targets]
    scores = [s if not math.isnan(s) else -math.inf for s in verdict.scores]
    if not scores:
        return []
    return [(max(range(len(scores)), key=lambda k: scores[k]), False)]


def write_scan(report: ScanReport, out: Path, clean: ImageData | None, model_name: str, *,
               model: nn.Module | None = None) -> list[Path]:
    """Write ``report``'s files into folder ``out`` (see the module's docstring); returns their
    paths.

    Args:
        report: the scan.
        out: the folder.
        clean: clean data to stamp the pictured triggers on (none: the triggers alone).
        model_name: the scanned model's file name, for the record and the page's title.
        model: the scanned model, to title each stamped image with its answer.
    """
    out = Path(out)
    check_out(out)
    # mkdir, not mkdtemp: the folder gets the mode the umask gives any new folder, not 0700.
    build = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        build.mkdir()
    except OSError as error:
        raise GoodnetError(f"cannot write {out}: {error.strerror or error}") from None
    try:
        names = _write_files(report, build, clean, model_name, model)
        _move_into_place(build, out, names)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return [out / name for name in names]


def _write_files(report: ScanReport, folder: Path, clean: ImageData | None, model_name: str,
                 model: nn.Module | None) -> list[str]:
    """Every file of the scan in ``folder``; their names, ``scan.json`` last."""
    verdict = report.verdict
    names: list[str] = []
    pictures: list[tuple[int, bool, str]] = []
    for k, flagged in pictured_classes(report):
        name = f"class-{k}.png"
        if k < len(verdict.triggers):
            plot_trigger(folder / name, verdict.triggers[k], flagged, clean, model)
        elif k < len(report.images):
            plot_image(folder / name, report.images[k], k, flagged, scores_name(report),
                       verdict.scores[k] if k < len(verdict.scores) else math.nan)
        else:
            continue
        pictures.append((k, flagged, name))
        names.append(name)
    if verdict.triggers:
        save_triggers(folder / "triggers.safetensors", verdict)
        plot_triggers(folder / "triggers.png", verdict)
        names += ["triggers.safetensors", "triggers.png"]
    summary = scan_summary(report, clean, model_name)
    summary["pictures"] = [{"class": k, "flagged": flagged, "file": name}
                           for k, flagged, name in pictures]
    names.append("scan.html")
    summary["files"] = [*names, "scan.json"]
    page = scan_html(summary, folder, plot_scores(report) if verdict.scores else None)
    (folder / "scan.html").write_text(page, encoding="utf-8")
    (folder / "scan.json").write_text(json.dumps(summary, indent=2, allow_nan=False),
                                      encoding="utf-8")
    return summary["files"]


def _move_into_place(build: Path, out: Path, names: list[str]) -> None:
    """``build`` becomes ``out`` (a rename) when ``out`` is absent or empty; otherwise each file
    replaces its namesake in ``out``, ``scan.json`` last, and the class pictures the previous
    ``scan.json`` listed that this scan did not make are removed."""
    try:
        if not out.exists() or not any(out.iterdir()):
            os.replace(build, out)  # the whole folder at once (fails if one appeared meanwhile)
            return
        stale = set(_previous_pictures(out)) - set(names)
        for name in names:
            os.replace(build / name, out / name)
        for name in stale:
            (out / name).unlink(missing_ok=True)
    except OSError as error:
        raise GoodnetError(f"cannot write {out}: {error.strerror or error}") from None


def _previous_pictures(out: Path) -> list[str]:
    """The class pictures an earlier scan's ``scan.json`` in ``out`` lists (none if unreadable)."""
    try:
        previous = json.loads((out / "scan.json").read_text(encoding="utf-8"))
        listed = [p["file"] for p in previous["pictures"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [name for name in listed if isinstance(name, str) and name.startswith("class-")
            and name.endswith(".png") and name[6:-4].isdigit()]


def scan_summary(report: ScanReport, clean: ImageData | None, model_name: str) -> dict[str, Any]:
    """``scan.json``'s record (plain JSON values; a non-finite number is null)."""
    return {
        "goodnet_version": __version__, "model": model_name, "scanner": report.scanner,
        "settings": _plain(report.settings),
        "verdict": {**verdict_summary(report.verdict), "score_name": report.score_name,
                    "scores_name": scores_name(report)},
        "classes": report.classes, "clean_images": report.clean_images,
        "clean_data": clean.name if clean is not None and report.clean_images else None,
        "seconds": report.seconds, "notes": _plain(report.notes),
    }


def _plain(value: Any) -> Any:
    """``value`` as strict JSON values: non-finite floats become null, tensors lists."""
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


# ---------------------------------------------------------------- pictures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _show(axes: Any, image: torch.Tensor, title: str, color: str = "black") -> None:
    """A (C, H, W) image in [0, 1] on ``axes`` (greyscale or the first three channels)."""
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        axes.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        axes.imshow(image[:3].permute(1, 2, 0).numpy())
    axes.set_title(title, fontsize=7, color=color)
    axes.axis("off")


def _stamped(trigger: ReversedTrigger, clean: ImageData | None,
             model: nn.Module | None) -> list[tuple[torch.Tensor, str]]:
    """Up to :data:`STAMPED` clean images of other classes than the trigger's, stamped, each
    titled with its true class and (given the model) the model's answer."""
    if clean is None:
        return []
    others = torch.nonzero(clean.labels != trigger.target).flatten()[:STAMPED]
    if len(others) == 0:
        return []
    x, y = clean.get(others)
    x = trigger.apply(x)
    titles = [f"class {int(label)}" for label in y]
    if model is not None:
        with torch.no_grad():
            answers = model(x.to(model_device(model))).argmax(1).tolist()
        titles = [f"{title} → {answer}" for title, answer in zip(titles, answers, strict=True)]
    return list(zip(x, titles, strict=True))


def plot_trigger(path: Path, trigger: ReversedTrigger, flagged: bool,
                 clean: ImageData | None, model: nn.Module | None) -> Path:
    """One class's reversed trigger: mask, pattern, mask × pattern, and clean images stamped
    (titled "true class → the model's answer")."""
    plt = _pyplot()
    stamped = _stamped(trigger, clean, model)
    panels = 3 + len(stamped)
    figure, grid = plt.subplots(1, panels, figsize=(1.6 * panels, 2.1), dpi=120, squeeze=False)
    _show(grid[0, 0], trigger.mask, f"mask (|m| {trigger.norm:.1f})")
    _show(grid[0, 1], trigger.pattern, "pattern")
    _show(grid[0, 2], trigger.mask * trigger.pattern, "mask × pattern")
    for axes, (image, title) in zip(grid[0, 3:], stamped, strict=True):
        _show(axes, image, title)
    state = "flagged" if flagged else "not flagged"
    figure.suptitle(f"class {trigger.target} ({state}): reversed trigger, success "
                    f"{100 * trigger.success:.1f} %", fontsize=9,
                    color="red" if flagged else "black")
    return _save(figure, path)


def plot_image(path: Path, image: torch.Tensor, k: int, flagged: bool, score_name: str,
               score: float) -> Path:
    """The input a scanner optimised for class ``k``."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(2.6, 2.9), dpi=120)
    _show(axes, image, f"class {k} ({'flagged' if flagged else 'not flagged'})\n"
                       f"{score_name} {score:.3g}", "red" if flagged else "black")
    return _save(figure, path)


def plot_scores(report: ScanReport) -> bytes:
    """The per-class statistic as a bar chart (flagged classes red, the threshold dashed where it
    applies to the per-class values), as PNG bytes; infinite values are drawn at the top."""
    plt = _pyplot()
    verdict = report.verdict
    finite = [s for s in verdict.scores if math.isfinite(s)]
    shared = _shared_scale(report) and math.isfinite(verdict.threshold)
    threshold = verdict.threshold if shared else 0.0
    top, low = max([*finite, threshold, 0.0]), min([*finite, 0.0])
    shown = [0.0 if math.isnan(s) else min(max(s, low), 1.1 * top) for s in verdict.scores]
    figure, axes = plt.subplots(figsize=(min(12.0, 2 + 0.35 * len(shown)), 3.0), dpi=120)
    axes.bar(range(len(shown)), shown, width=0.8,
             color=["#c0392b" if k in verdict.targets else "#7f8c8d" for k in range(len(shown))])
    if shared:
        axes.axhline(verdict.threshold, color="black", linestyle="--", linewidth=0.8,
                     label=f"threshold {verdict.threshold:g}")
        axes.legend(fontsize=8, loc="upper right")
    axes.set_xlabel("class")
    axes.set_ylabel(scores_name(report))
    if len(shown) <= 30:
        axes.set_xticks(range(len(shown)))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png")
    _pyplot().close(figure)
    return path


# ---------------------------------------------------------------- the page


def _image_tag(data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _class_rows(verdict: dict[str, Any]) -> str:
    """The table's rows: the :data:`TABLE_ROWS` most suspicious classes, flagged ones marked."""
    scores = verdict["scores"]
    triggers = {t["target"]: t for t in verdict["triggers"]}
    rank = sorted(range(len(scores)), reverse=True,
                  key=lambda k: -math.inf if scores[k] is None else scores[k])
    rows = []
    for k in rank[:TABLE_ROWS]:
        flagged = k in verdict["targets"]
        trigger = triggers.get(k)
        norm = _number(trigger["norm"]) if trigger else "–"
        success = f"{100 * trigger['success']:.1f} %" if trigger else "–"
        rows.append(f"<tr{' class=flagged' if flagged else ''}><td>{k}</td>"
                    f"<td>{_number(scores[k])}</td><td>{norm}</td><td>{success}</td>"
                    f"<td>{'yes' if flagged else ''}</td></tr>")
    if len(scores) > TABLE_ROWS:
        rows.append(f"<tr><td colspan=5>{len(scores) - TABLE_ROWS} more classes in scan.json"
                    "</td></tr>")
    return "".join(rows)


def scan_html(summary: dict[str, Any], folder: Path, chart: bytes | None = None) -> str:
    """The self-contained page of a scan: ``summary`` (``scan.json``'s record), the pictures
    already written in ``folder`` and ``chart``, the per-class bar chart (PNG)."""
    e = html.escape
    verdict = summary["verdict"]
    pictures = "\n".join(
        f"<figure>{_image_tag((folder / p['file']).read_bytes(), p['file'])}<figcaption>class "
        f"{p['class']} ({'flagged' if p['flagged'] else 'the most suspicious class, not flagged'})"
        f"</figcaption></figure>" for p in summary["pictures"])
    if (folder / "triggers.png").exists():
        pictures += ("\n<h2>Every class's reversed trigger</h2>\n"
                     + _image_tag((folder / "triggers.png").read_bytes(), "triggers.png"))
    settings = ", ".join(f"{k}={v}" for k, v in summary["settings"].items())
    said, style = ("BACKDOORED", "backdoored") if verdict["backdoored"] else \
        ("no backdoor found", "clean")
    data = (f"{summary['clean_images']} clean images ({summary['clean_data']})"
            if summary["clean_images"] else "no data (data-free)")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>goodnet scan: {e(summary['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }}
th {{ background: #f0f0f0; }}
tr.flagged td {{ background: #fbe3e0; font-weight: bold; }}
.verdict {{ font-size: 1.4em; font-weight: bold; }}
.backdoored {{ color: #c0392b; }} .clean {{ color: #1e8449; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>goodnet scan: {e(summary['model'])}</h1>
<p class="verdict {style}">{said}</p>
<p>{e(verdict['score_name'])} {_number(verdict['score'])}
{'&gt;' if verdict['backdoored'] else '≤'} threshold {_number(verdict['threshold'])};
suspected target classes: {e(', '.join(map(str, verdict['targets'])) or 'none')}.</p>
<p>Scanner {e(summary['scanner'])} ({e(settings)}) on a model of {summary['classes']} classes,
with {e(data)}; {summary['seconds']:.1f} s; goodnet {e(summary['goodnet_version'])}.</p>
<h2>Per class</h2>
{_image_tag(chart, "per-class statistic") if chart else ""}
<table><tr><th>class</th><th>{e(verdict['scores_name'])}</th><th>trigger norm</th>
<th>trigger success</th><th>flagged</th></tr>{_class_rows(verdict)}</table>
<h2>Pictured classes</h2>
{pictures or "<p>none</p>"}
</body></html>
"""
