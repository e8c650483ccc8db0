"""The image-to-image translation part of the evaluation report (see :mod:`medexp.reports.evaluation`).

One prediction pass over the split translates every source (the model's ``postprocess(infer(x))``,
images in the data's ``target_intensity_range``) and scores each case against its target: MAE,
PSNR and SSIM (Gaussian window of 11, or the largest odd size the image allows), the span of
``target_intensity_range`` the data range. The same numbers of the source itself against the
target (``*_source``) are the identity baseline a model must beat, where source and target share
channels and value range. The summary is computed as the test metrics
(:func:`medexp.metrics.translation.translation_metrics`) compute theirs, so it equals them:
MAE and PSNR over every value of the split, SSIM the mean over cases.

The figure shows, one row per case, source | translated | target | |translated - target| for the
worst cases by MAE and the median case (3D: the middle slice along the last axis), drawn in a
second pass over the batches that hold them, so no image is held for the whole split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

METRICS = ("mae", "psnr", "ssim")


def _ranges(datamodule: Any) -> tuple[list[float], list[float]]:
    source = [float(v) for v in getattr(datamodule, "intensity_range", None) or (0.0, 1.0)]
    target = [float(v) for v in getattr(datamodule, "target_intensity_range", None) or source]
    return source, target


def case_metrics(preds: torch.Tensor, target: torch.Tensor, data_range: float) -> dict[str, torch.Tensor]:
    """Per case sums of absolute and squared errors, value counts, and SSIM of ``preds`` against
    ``target``, both ``(B, C, *spatial)``, ``data_range`` the span of the values; each ``(B,)``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    preds, target = preds.double(), target.double()
    dims = tuple(range(1, preds.ndim))
    smallest = min(preds.shape[2:])
    kernel = min(11, smallest if smallest % 2 else smallest - 1)
    ssim = structural_similarity_index_measure(
        preds, target, data_range=data_range, kernel_size=kernel, reduction="none"
    )
    return {
        "abs": (preds - target).abs().sum(dim=dims),
        "squared": (preds - target).square().sum(dim=dims),
        "count": torch.full((len(preds),), float(preds[0].numel()), dtype=torch.float64),
        "ssim": ssim.reshape(len(preds)),
    }


def _psnr(squared: float, count: float, data_range: float) -> float:
    return float(10 * np.log10(data_range**2 / (squared / count))) if squared > 0 else float("inf")


def _view(image: np.ndarray) -> np.ndarray:
    """A ``(C, *spatial)`` image as shown: 2D its first channel (RGB with 3 channels, channels
    last); 3D the middle slice along the last axis."""
    if image.ndim == 4:
        image = image[..., image.shape[-1] // 2]
    return np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image[0]


def collect_translation(
    trainer: Any, model: Any, datamodule: Any, loader: Any, max_batches: int | None, worst: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report's numbers of a translation model over ``loader`` and the figure's cases
    (``{case, kind, mae, source, translated, target}``, 2D views): up to ``worst`` cases of the
    highest MAE (those above the median) and the median case."""
    from medexp.inference.loop import prediction_pass

    source_range, target_range = _ranges(datamodule)
    if not getattr(datamodule, "truth", True):
        return _without_truth(trainer, model, loader, max_batches, worst, target_range)
    span = target_range[1] - target_range[0]
    per_case: list[dict[str, float]] = []
    totals: dict[str, dict[str, float]] = {"": {}, "_source": {}}
    # the source scored as a translation: only where it is an image of the target's kind
    compared = getattr(datamodule, "in_channels", None) == getattr(datamodule, "out_channels", None)
    compared = compared and source_range == target_range

    def visit(outputs: Any, translated: torch.Tensor, batch: dict[str, Any]) -> None:
        source, target = batch[model.input_key], batch[model.target_key]
        scored = {"": case_metrics(translated, target, span)}
        if compared:
            scored["_source"] = case_metrics(source, target, span)
        for suffix, values in scored.items():
            for key, value in values.items():
                totals[suffix][key] = totals[suffix].get(key, 0.0) + float(value.sum())
        for i in range(len(target)):
            row: dict[str, float] = {"case": len(per_case)}
            for suffix, values in scored.items():
                count = float(values["count"][i])
                row[f"mae{suffix}"] = float(values["abs"][i]) / count
                row[f"psnr{suffix}"] = _psnr(float(values["squared"][i]), count, span)
                row[f"ssim{suffix}"] = float(values["ssim"][i])
            per_case.append(row)

    prediction_pass(trainer, model, loader, max_batches, visit)
    n = len(per_case)
    by_mae = sorted(range(n), key=lambda i: (-per_case[i]["mae"], i))
    median = by_mae[n // 2] if n else None
    worst_cases = by_mae[: min(max(worst, 0), n // 2)]  # above the median only
    shown = [(i, "worst") for i in worst_cases] + ([] if median is None else [(median, "median")])
    cases = _pictures(model, trainer, loader, max_batches, shown) if shown else []
    metrics: dict[str, float] = {}
    for suffix, total in totals.items():
        if total:  # as the test metrics: MAE and PSNR over every value of the split, SSIM the mean of the cases'
            metrics[f"mae{suffix}"] = total["abs"] / total["count"]
            metrics[f"psnr{suffix}"] = _psnr(total["squared"], total["count"], span)
            metrics[f"ssim{suffix}"] = total["ssim"] / n
    numbers = {
        "n": n,
        "truth": True,
        "metrics": metrics,
        "data_range": target_range,
        "per_case": per_case,
        "worst_cases": [{key: per_case[i][key] for key in ("case", *METRICS)} for i in worst_cases],
        "median_case": None if median is None else {key: per_case[median][key] for key in ("case", *METRICS)},
        "figure_rows": [{"case": case["case"], "kind": case["kind"], "mae": case["mae"]} for case in cases],
        "notes": (
            f"translated vs target, data range {target_range}: MAE and PSNR over every value of the split, SSIM "
            "(Gaussian window of 11, or the largest odd size that fits) the mean over cases, as the test metrics; "
            "per case the same of each case (PSNR infinite for a perfect case). *_source: the source itself scored "
            "against the target, the identity baseline (only where source and target share channels and value "
            "range). case: the index in the split's loader order"
        ),
    }
    return numbers, cases


def _without_truth(
    trainer: Any, model: Any, loader: Any, max_batches: int | None, worst: int, target_range: list[float]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Data without true targets (``data.truth=false``, unpaired folders): nothing to score;
    the figure shows the first ``worst + 1`` sources and their translations."""
    from medexp.inference.loop import prediction_pass

    n = 0

    def count(outputs: Any, translated: torch.Tensor, batch: dict[str, Any]) -> None:
        nonlocal n
        n += len(translated)

    prediction_pass(trainer, model, loader, max_batches, count)
    cases = _pictures(model, trainer, loader, max_batches, [(i, "example") for i in range(min(n, worst + 1))])
    numbers = {
        "n": n,
        "truth": False,
        "metrics": {},
        "data_range": target_range,
        "per_case": [],
        "worst_cases": [],
        "median_case": None,
        "figure_rows": [{"case": case["case"], "kind": case["kind"]} for case in cases],
        "notes": (
            "the data have no true targets (data.truth=false: unpaired folders), so translations are not scored; "
            "the figure shows the first sources and their translations"
        ),
    }
    return numbers, cases


def _pictures(
    model: Any, trainer: Any, loader: Any, max_batches: int | None, shown: list[tuple[int, str]]
) -> list[dict[str, Any]]:
    """The 2D views of the ``shown`` cases ``(index, kind)``, in that order, from a second pass
    that stops after the last batch holding one of them."""
    from medexp.inference.loop import prediction_pass

    batch_size = getattr(loader, "batch_size", None)
    if batch_size:
        needed = max(i for i, _ in shown) // batch_size + 1
        max_batches = needed if max_batches is None else min(max_batches, needed)
    kind_of = dict(shown)
    found: dict[int, dict[str, Any]] = {}
    seen = 0

    def visit(outputs: Any, translated: torch.Tensor, batch: dict[str, Any]) -> None:
        nonlocal seen
        source, target = batch[model.input_key], batch[model.target_key]
        for i in range(len(target)):
            if seen + i in kind_of:
                views = {
                    "source": _view(source[i].float().cpu().numpy()),
                    "translated": _view(translated[i].float().cpu().numpy()),
                    "target": _view(target[i].float().cpu().numpy()),
                }
                mae = float((translated[i].double() - target[i].double()).abs().mean())
                found[seen + i] = {"case": seen + i, "kind": kind_of[seen + i], "mae": mae, **views}
        seen += len(target)

    prediction_pass(trainer, model, loader, max_batches, visit)
    return [found[i] for i, _ in shown if i in found]


def translation_figures(out: Path, report: dict[str, Any], cases: list[dict[str, Any]]) -> list[Path]:
    """``cases.png``: one row per case, source | translated | target | |difference| (without
    true targets: source | translated)."""
    from medexp.reports.figures import pyplot, save_figure

    if not cases:
        return []
    plt = pyplot()
    low, high = report["data_range"]
    truth = report.get("truth", True)
    columns = 4 if truth else 2
    figure, axes = plt.subplots(len(cases), columns, figsize=(2.5 * columns, 2.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        translated = np.clip(case["translated"], low, high)
        panels = [("source", case["source"], {"cmap": "gray"})]
        panels.append(("translated", translated, {"cmap": "gray", "vmin": low, "vmax": high}))
        if truth:
            difference = np.abs(case["translated"] - case["target"])
            if difference.ndim == 3:  # RGB: the largest difference of a pixel's channels
                difference = difference.max(axis=-1)
            panels.append(("target", np.clip(case["target"], low, high), {"cmap": "gray", "vmin": low, "vmax": high}))
            panels.append(("|difference|", difference, {"cmap": "magma", "vmin": 0, "vmax": high - low}))
        for axis, (title, image, style) in zip(row, panels):
            if image.ndim == 3:  # RGB, shown in the data range
                image = (np.clip(image, low, high) - low) / (high - low)
            axis.imshow(image, **style)
            axis.set_axis_off()
            if title == "source":
                scored = f", MAE {case['mae']:.3g}" if truth else ""
                title = f"case {case['case']} ({case['kind']}{scored}): source"
            axis.set_title(title, fontsize=8)
    title = "worst cases by MAE and the median case" if truth else "sources and their translations (no true targets)"
    figure.suptitle(title, fontsize=10)
    return [save_figure(figure, out / "cases.png")]


def translation_blocks(report: dict[str, Any], images: dict[str, str], recorded: Any) -> list[tuple]:
    """The report's sections after its title (see :func:`medexp.reports.render._blocks`)."""
    from medexp.reports.tables import number_text

    if not report.get("truth", True):
        return [("h2", "Cases"), ("p", report["notes"]), ("img", images.get("cases"), "sources and translations")]
    metrics = report["metrics"]
    names = {"mae": "MAE", "psnr": "PSNR (dB)", "ssim": "SSIM"}
    rows = [
        [
            names[name],
            number_text(metrics.get(name)),
            recorded(name),
            number_text(metrics.get(f"{name}_source")),
            recorded(f"{name}_source"),
        ]
        for name in METRICS
    ]

    def case_row(case: dict[str, Any], kind: str) -> list[Any]:
        return [case["case"], kind, *(number_text(case[name]) for name in METRICS)]

    shown = [case_row(case, "worst") for case in report["worst_cases"]]
    if report.get("median_case") is not None:
        shown.append(case_row(report["median_case"], "median"))
    return [
        ("h2", "Summary"),
        (
            "table",
            ["metric", "translated vs target", "metrics.json", "source vs target (baseline)", "metrics.json"],
            rows,
        ),
        ("p", report["notes"]),
        ("h2", "Worst and median cases"),
        ("table", ["case", "kind", "MAE", "PSNR", "SSIM"], shown),
        ("img", images.get("cases"), "source, translated, target and difference of the worst and median cases"),
    ]
