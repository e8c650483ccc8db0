"""Evaluation reports of classification and segmentation runs, and temperature scaling.

- :func:`medexp.reports.evaluation.write_report`: ``<run>/report/`` (``report.json``,
  ``report.md``, ``report.html``, PNG figures), written at the end of ``medexp train``
  (``report: true``) and by ``medexp eval ckpt_path=... report=true``;
- :func:`medexp.reports.calibration.calibrate_checkpoint`: ``model.calibrate=true``.

Imported lazily by the entry points; matplotlib only when figures are drawn.
"""

from __future__ import annotations

from typing import Any


def write_report(*args: Any, **kwargs: Any) -> Any:
    """See :func:`medexp.reports.evaluation.write_report`."""
    from medexp.reports.evaluation import write_report as write

    return write(*args, **kwargs)


__all__ = ["write_report"]
