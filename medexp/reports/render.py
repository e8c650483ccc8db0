"""Figures (matplotlib, Agg backend, imported lazily) and documents of an evaluation report:
``report.json``, ``report.md`` (linking the PNGs beside it) and ``report.html`` (self-contained,
the PNGs embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from medexp.reports.figures import pyplot, save_figure
from medexp.reports.tables import number_text

# --------------------------------------------------------------------------------------------
# figures


def _shown_classes(report: dict[str, Any]) -> list[int]:
    """The classes with curves: the positive class of a binary task, else every class."""
    return [1] if report["task"] == "binary" else list(range(len(report["classes"])))


def confusion_figure(path: Path, report: dict[str, Any]) -> Path:
    plt = pyplot()
    matrix = np.asarray(report["confusion_matrix"])
    names = report["classes"]
    if report["task"] == "multilabel":
        cols = min(len(names), 5)
        rows = math.ceil(len(names) / cols)
        figure, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
        for axis in axes.flat[len(names) :]:
            axis.set_axis_off()
        for axis, name, m in zip(axes.flat, names, matrix):
            axis.imshow(m, cmap="Blues")
            _annotate(axis, m)
            axis.set_xticks([0, 1], ["0", "1"], fontsize=7)
            axis.set_yticks([0, 1], ["0", "1"], fontsize=7)
            axis.set_title(name, fontsize=8)
        figure.suptitle("confusion per label (rows: true, columns: predicted at 0.5)", fontsize=9)
        return save_figure(figure, path)
    size = min(10.0, 2.5 + 0.5 * len(names))
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(matrix, cmap="Blues")
    if len(names) <= 20:
        _annotate(axis, matrix)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("confusion matrix")
    figure.colorbar(image, ax=axis, fraction=0.046)
    return save_figure(figure, path)


def roc_figure(path: Path, report: dict[str, Any], curves: dict[str, Any]) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for c in _shown_classes(report):
        fpr, tpr = curves["roc"][c]
        row = report["per_class"][c]
        axis.plot(fpr, tpr, lw=1.2, label=f"{row['class']} (AUC {number_text(row['auroc'], 3)})")
    axis.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    auroc = report["metrics"]["auroc"]
    if report["task"] == "binary":
        title = f"ROC of the positive class; AUROC {number_text(auroc['value'], 3)}"
    else:
        kind = "one-vs-rest" if report["task"] == "multiclass" else "per label"
        title = f"ROC, {kind}; macro AUROC {number_text(auroc['value'], 3)}"
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, loc="lower right")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    return save_figure(figure, path)


def pr_figure(path: Path, report: dict[str, Any], curves: dict[str, Any]) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    for c in _shown_classes(report):
        recall, precision = curves["pr"][c]
        row = report["per_class"][c]
        (line,) = axis.plot(
            recall, precision, lw=1.2, label=f"{row['class']} (AP {number_text(row['average_precision'], 3)})"
        )
        axis.axhline(curves["prevalence"][c], color=line.get_color(), lw=0.6, ls=":")
    axis.set_xlabel("recall (sensitivity)")
    axis.set_ylabel("precision (PPV)")
    axis.set_title("precision-recall (dotted: prevalence)", fontsize=10)
    axis.legend(fontsize=7, loc="lower left")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.01)
    return save_figure(figure, path)


def reliability_figure(path: Path, report: dict[str, Any]) -> Path:
    plt = pyplot()
    calibration = report["calibration"]
    panels = [("T = 1", calibration["reliability_uncalibrated"], calibration["ece_uncalibrated"])]
    if calibration["temperature"] != 1.0:
        panels.append((f"T = {calibration['temperature']:.3g}", calibration["reliability"], calibration["ece"]))
    what = "confidence of the predicted class" if report["task"] != "multilabel" else "label probability (pooled)"
    figure, axes = plt.subplots(
        2,
        len(panels),
        figsize=(4.2 * len(panels), 5),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex=True,
    )
    for col, (title, bins, value) in enumerate(panels):
        edges = np.asarray(bins["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        accuracy = np.nan_to_num(np.asarray(bins["accuracy"], dtype=float))
        confidence = np.asarray(bins["confidence"], dtype=float)
        top, bottom = axes[0][col], axes[1][col]
        top.bar(
            centres,
            accuracy,
            width=width,
            edgecolor="black",
            lw=0.5,
            label="accuracy" if report["task"] != "multilabel" else "fraction positive",
        )
        gap = np.where(np.isfinite(confidence), confidence - accuracy, 0.0)
        top.bar(centres, gap, bottom=accuracy, width=width, color="red", alpha=0.3, label="gap to confidence")
        top.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{title}: ECE {value:.4f}", fontsize=10)
        top.legend(fontsize=7, loc="upper left")
        bottom.bar(centres, bins["count"], width=width, color="grey")
        bottom.set_xlabel(what, fontsize=8)
        bottom.set_ylabel("count", fontsize=8)
    return save_figure(figure, path)


def classification_figures(out: Path, report: dict[str, Any], curves: dict[str, Any]) -> list[Path]:
    return [
        confusion_figure(out / "confusion_matrix.png", report),
        roc_figure(out / "roc.png", report, curves),
        pr_figure(out / "precision_recall.png", report, curves),
        reliability_figure(out / "reliability.png", report),
    ]


def distribution_figure(path: Path, report: dict[str, Any]) -> Path:
    plt = pyplot()
    dice = np.array([row["dice"] for row in report["per_case"]], dtype=float)
    hd95 = np.array([row["hd95"] for row in report["per_case"]], dtype=float)
    figure, axes = plt.subplots(2, 2, figsize=(8, 4.5), gridspec_kw={"height_ratios": [1, 3]}, sharex="col")
    for col, (name, values) in enumerate((("Dice", dice), ("HD95 (pixels)", hd95))):
        values = values[np.isfinite(values)]
        box, hist = axes[0][col], axes[1][col]
        if values.size:
            box.boxplot(values, vert=False, widths=0.6)
            hist.hist(values, bins=min(30, max(5, values.size // 3)), color="tab:blue", edgecolor="black", lw=0.4)
        box.set_yticks([])
        box.set_title(f"{name} per case (n={values.size})", fontsize=10)
        hist.set_xlabel(name)
        hist.set_ylabel("cases")
    return save_figure(figure, path)


def worst_cases_figure(path: Path, cases: list[tuple]) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 3.3), squeeze=False)
    for axis, (dice, index, image, truth, prediction) in zip(axes[0], cases):
        axis.imshow(image, cmap="gray")
        axis.imshow(np.ma.masked_equal(prediction, 0), cmap="autumn", alpha=0.5, interpolation="nearest")
        if truth.any():
            axis.contour(truth > 0, levels=[0.5], colors="lime", linewidths=1)
        axis.set_title(f"case {index}: Dice {dice:.3f}", fontsize=9)
        axis.set_axis_off()
    figure.suptitle("worst cases by Dice (truth: green outline, prediction: red)", fontsize=9)
    return save_figure(figure, path)


def segmentation_figures(out: Path, report: dict[str, Any], cases: list[tuple]) -> list[Path]:
    figures = [distribution_figure(out / "case_metrics.png", report)]
    if cases:
        figures.append(worst_cases_figure(out / "worst_cases.png", cases))
    return figures


# --------------------------------------------------------------------------------------------
# documents: a list of blocks rendered as Markdown and as HTML


def _interval(value: dict[str, Any]) -> str:
    """``low - high``, or ``undefined`` when either end is (an undefined metric has no interval)."""
    low, high = value["ci_low"], value["ci_high"]
    if any(end is None or math.isnan(end) for end in (low, high)):
        return "undefined"
    return f"{number_text(low)} - {number_text(high)}"


def _annotate(axis: Any, matrix: np.ndarray) -> None:
    """Write each count of a confusion matrix into its cell, white on the dark ones."""
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        axis.text(j, i, str(value), ha="center", va="center", fontsize=8, color=color)


def _blocks(report: dict[str, Any], figures: list[Path]) -> list[tuple]:
    images = {path.stem: path.name for path in figures}
    blocks: list[tuple] = [("h1", f"Evaluation report: {report['task']}, {report['split']} split")]
    facts = [f"cases: {report['n']}", f"model: {report['model']}"]
    if report.get("checkpoint"):
        facts.append(f"checkpoint: {report['checkpoint']}")
    blocks.append(("p", "; ".join(facts)))
    agreement = report.get("agreement", {})

    def recorded(name: str) -> str:
        entry = agreement.get(name)
        return number_text(entry["metrics"]) if entry else "-"

    if report["task"] == "detection":
        from medexp.reports.detection import detection_blocks

        return blocks + detection_blocks(report, images, recorded)
    if report["task"] == "translation":
        from medexp.reports.translation import translation_blocks

        return blocks + translation_blocks(report, images, recorded)
    if report["task"] == "segmentation":
        return blocks + _segmentation_blocks(report, images, recorded)
    return blocks + _classification_blocks(report, images, recorded)


def _segmentation_blocks(report: dict[str, Any], images: dict[str, str], recorded: Any) -> list[tuple]:
    """The sections of a segmentation report: summary, per-case distributions, worst cases."""
    rows = [[name, number_text(report["metrics"][name]), recorded(name)] for name in ("dice", "hd95")]
    blocks: list[tuple] = [("h2", "Summary"), ("table", ["metric", "value", "metrics.json"], rows)]
    rows = [
        [name, *(number_text(summary.get(key), 3) for key in ("n", "mean", "min", "q1", "median", "q3", "max"))]
        for name, summary in (("Dice", report["dice_summary"]), ("HD95", report["hd95_summary"]))
    ]
    blocks += [
        ("h2", "Per-case distributions"),
        ("table", ["", "cases", "mean", "min", "q1", "median", "q3", "max"], rows),
        ("p", report["notes"]),
        ("img", images.get("case_metrics"), "per-case Dice and HD95"),
        ("h2", "Worst cases"),
        (
            "table",
            ["case", "Dice", "HD95"],
            [[c["case"], number_text(c["dice"]), number_text(c["hd95"], 2)] for c in report["worst_cases"]],
        ),
        ("img", images.get("worst_cases"), "worst cases"),
    ]
    return blocks


def _classification_blocks(report: dict[str, Any], images: dict[str, str], recorded: Any) -> list[tuple]:
    """The sections of a classification report: summary with intervals, per site, per class,
    confusion matrix, curves, calibration."""
    blocks: list[tuple] = []
    metrics = report["metrics"]
    boot = report["bootstrap"]
    rows = [
        [name, number_text(metrics[name]["value"]), _interval(metrics[name]), recorded(name)]
        for name in ("accuracy", "auroc")
    ]
    rows += [
        [name, number_text(metrics[name]), "", recorded(name)] for name in metrics if name not in ("accuracy", "auroc")
    ]
    blocks += [
        ("h2", "Summary"),
        ("table", ["metric", "value", "95% CI", "metrics.json"], rows),
        (
            "p",
            f"Confidence intervals: percentile bootstrap, {boot['n_resamples']} resamples of the cases (seed "
            f"{boot['seed']}). AUROC: macro over {'labels' if report['task'] == 'multilabel' else 'classes, one-vs-rest'}.",
        ),
    ]
    if report.get("per_site"):
        columns = [key for key in ("accuracy", "balanced_accuracy", "auroc", "f1") if key in report["per_site"][0]]
        blocks += [
            ("h2", "Per site"),
            (
                "table",
                ["site", "cases", *columns, "auroc in metrics.json"],
                [
                    [r["site"], r["n"], *(number_text(r[key]) for key in columns), recorded(f"site_{r['site']}/auroc")]
                    for r in report["per_site"]
                ],
            ),
        ]
    return blocks + _per_class_blocks(report, images) + _calibration_blocks(report, images)


def _per_class_blocks(report: dict[str, Any], images: dict[str, str]) -> list[tuple]:
    """Per-class table, confusion matrix and curves of a classification report."""
    blocks: list[tuple] = [
        ("h2", "Per class" if report["task"] != "multilabel" else "Per label"),
        (
            "table",
            ["class", "precision", "recall", "F1", "support", "AUROC", "AP"],
            [
                [
                    r["class"],
                    number_text(r["precision"]),
                    number_text(r["recall"]),
                    number_text(r["f1"]),
                    r["support"],
                    number_text(r["auroc"]),
                    number_text(r["average_precision"]),
                ]
                for r in report["per_class"]
            ],
        ),
        ("h2", "Confusion matrix"),
    ]
    if report["task"] != "multilabel":
        names = report["classes"]
        blocks.append(
            (
                "table",
                ["true \\ predicted", *names],
                [[name, *row] for name, row in zip(names, report["confusion_matrix"])],
            )
        )
    blocks += [
        ("img", images.get("confusion_matrix"), "confusion matrix"),
        ("h2", "ROC and precision-recall curves"),
        ("img", images.get("roc"), "ROC curves"),
        ("img", images.get("precision_recall"), "precision-recall curves"),
    ]
    return blocks


def _calibration_blocks(report: dict[str, Any], images: dict[str, str]) -> list[tuple]:
    """ECE and NLL before and after temperature scaling, and the reliability diagram."""
    c = report["calibration"]
    rows = [["T = 1 (uncalibrated)", number_text(c["ece_uncalibrated"]), number_text(c["nll_uncalibrated"])]]
    if c["temperature"] != 1.0:
        rows.append([f"T = {c['temperature']:.4g} (temperature scaling)", number_text(c["ece"]), number_text(c["nll"])])
    text = (
        f"ECE: {c['ece_kind']}, {c['n_bins']} equal-width bins (torchmetrics); NLL: mean "
        f"{'binary cross-entropy over labels' if report['task'] == 'multilabel' else 'cross-entropy'}."
    )
    blocks: list[tuple] = [("h2", "Calibration"), ("table", ["", "ECE", "NLL"], rows), ("p", text)]
    fit = c.get("fit")
    if fit:
        blocks += [
            (
                "p",
                f"Temperature fitted on the {fit['split']} split ({fit['n']} cases): "
                f"ECE {number_text(fit['ece_before'])} -> {number_text(fit['ece_after'])}, NLL {number_text(fit['nll_before'])} -> {number_text(fit['nll_after'])}.",
            ),
        ]
    blocks.append(("img", images.get("reliability"), "reliability diagram"))
    return blocks


def _markdown(blocks: list[tuple]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(cell(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img" and block[1]:
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def _html(blocks: list[tuple], out: Path) -> str:
    e = html.escape
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img" and block[1]:
            data = base64.b64encode((out / block[1]).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{e(block[2])}" src="data:image/png;base64,{data}"></figure>')
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:0.2em 0.6em;"
        "text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}figure{margin:0.5em 0}"
    )
    title = e(blocks[0][1]) if blocks else "evaluation report"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_documents(out: Path, report: dict[str, Any], figures: list[Path]) -> None:
    """``report.json``, ``report.md`` and ``report.html`` in ``out``."""
    from medexp.utils.run_info import write_json

    write_json(out / "report.json", report)
    blocks = _blocks(report, figures)
    (out / "report.md").write_text(_markdown(blocks) + "\n")
    (out / "report.html").write_text(_html(blocks, out))
