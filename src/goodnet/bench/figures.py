"""What the figures of a benchmark report share: how one is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from goodnet.artifacts import atomic_path


def save_figure(figure: Any, path: Path, plt: Any) -> Path:
    """Lay ``figure`` out, write it to ``path`` as a PNG (atomically: a reader never sees half
    a file) and close it (``plt``: matplotlib's pyplot, which keeps every open figure)."""
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", bbox_inches="tight")
    plt.close(figure)
    return path
