"""Matplotlib for the reports' figures: the Agg backend (files only), imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 100


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display on training machines)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    """Save ``figure`` as a PNG at ``path`` (laid out tight) and close it."""
    plt = pyplot()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path
