"""Reverse-engineered triggers (Neural Cleanse's, say) on disk and in a picture.

A scan's triggers are saved as one safetensors file, ``mask.<class>`` ``(1, H, W)`` and
``pattern.<class>`` ``(C, H, W)`` per class, with the verdict (flagged classes, anomaly
indices, norms) as JSON metadata, so that any safetensors reader can open them and
``goodnet scan`` can reuse them; loading never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from goodnet.artifacts import atomic_path, write_bytes_atomic
from goodnet.errors import GoodnetError
from goodnet.methods import ReversedTrigger, ScanVerdict

VERDICT_KEY = "goodnet.scan"


def verdict_summary(verdict: ScanVerdict) -> dict[str, Any]:
    """The verdict as plain JSON values (the triggers' norms and success, not their pixels)."""
    def number(value: float) -> float | None:
        return value if math.isfinite(value) else None

    summary: dict[str, Any] = {
        "backdoored": verdict.backdoored, "targets": list(verdict.targets),
        "score": number(verdict.score), "threshold": number(verdict.threshold),
        "scores": [number(s) for s in verdict.scores],
        "triggers": [{"target": t.target, "norm": t.norm, "success": number(t.success)}
                     for t in verdict.triggers],
    }
    if verdict.fully_reversed:
        summary["fully_reversed"] = list(verdict.fully_reversed)
    return summary


def save_triggers(path: str | os.PathLike[str], verdict: ScanVerdict) -> Path:
    """Write ``verdict``'s triggers and summary to ``path`` (safetensors), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for trigger in verdict.triggers:
        tensors[f"mask.{trigger.target}"] = trigger.mask.detach().float().cpu().contiguous()
        tensors[f"pattern.{trigger.target}"] = trigger.pattern.detach().float().cpu().contiguous()
    metadata = {VERDICT_KEY: json.dumps(verdict_summary(verdict))}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata=metadata))
    return Path(path)


def load_triggers(path: str | os.PathLike[str]) -> ScanVerdict:
    """The verdict and triggers :func:`save_triggers` wrote."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            summary = json.loads((handle.metadata() or {})[VERDICT_KEY])
            triggers = tuple(
                ReversedTrigger(int(t["target"]), handle.get_tensor(f"mask.{t['target']}"),
                                handle.get_tensor(f"pattern.{t['target']}"),
                                float(t["norm"]), _number(t["success"]))
                for t in summary["triggers"])
    except FileNotFoundError:
        raise GoodnetError(f"{path}: no such file") from None
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise GoodnetError(f"{path}: not a goodnet triggers file ({error})") from None

    return ScanVerdict(
        backdoored=bool(summary["backdoored"]),
        targets=tuple(int(t) for t in summary["targets"]),
        score=_number(summary["score"]), threshold=_number(summary["threshold"]),
        scores=tuple(_number(s) for s in summary["scores"]), triggers=triggers,
        fully_reversed=tuple(int(k) for k in summary.get("fully_reversed", [])))


def _number(value: Any) -> float:
    """A stored number, None (JSON's NaN) as NaN."""
    return float(value) if isinstance(value, int | float) else float("nan")


def plot_triggers(path: str | os.PathLike[str], verdict: ScanVerdict) -> Path:
    """Each class's trigger (mask × pattern) with its mask norm and anomaly index, flagged
    classes titled in red, as a PNG; where the scan reversed only some classes in full (K-Arm's
    pre-selection), those classes' alone."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [t for t in verdict.triggers
             if not verdict.fully_reversed or t.target in verdict.fully_reversed]
    count = len(shown)
    if count == 0:
        raise GoodnetError("the scan made no triggers to plot")
    columns = min(count, 10)
    rows = math.ceil(count / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.6 * rows), dpi=120,
                                squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for i, trigger in enumerate(shown):
        axes = grid.flat[i]
        image = (trigger.mask * trigger.pattern).clamp(0, 1)
        if image.shape[0] == 1:
            axes.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            axes.imshow(image[:3].permute(1, 2, 0).numpy())
        flagged = trigger.target in verdict.targets
        index = (verdict.scores[trigger.target] if trigger.target < len(verdict.scores)
                 else float("nan"))
        axes.set_title(f"{trigger.target}: |m| {trigger.norm:.0f}\nindex {index:.1f}",
                       fontsize=7, color="red" if flagged else "black")
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    plt.close(figure)
    return Path(path)
