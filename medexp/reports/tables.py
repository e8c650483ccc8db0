"""Numbers and tables as the reports' documents (Markdown, HTML) show them."""

from __future__ import annotations

import math
from typing import Any


def number_text(value: Any, digits: int = 4) -> str:
    """A number as the documents show it: ``-`` for none, ``undefined`` for NaN (e.g. the AUROC
    of a class absent from the split), never a made-up 0."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "undefined"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (dicts) in ``columns``: floats with 4 significant digits,
    None as an empty cell, ``|`` escaped."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
