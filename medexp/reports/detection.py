"""The detection part of the evaluation report (see :mod:`medexp.reports.evaluation`).

One prediction pass over the split gives each image's detections; the same
:class:`~medexp.metrics.detection.DetectionMetrics` as the test metrics scores them, so ``map_*``,
``froc`` and ``sens_fp*`` equal ``metrics.json``'s. Added: the FROC curve (sensitivity against
false positives per image), per-image counts at a display threshold (``SHOWN_SCORE``: lesions
found and missed, false positives), and overlays of the worst images by misses plus false
positives, true boxes in green and detections in red with their scores (3D: the slice through
the middle of the largest box).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# the detections counted per image and drawn on the overlays score at least this
SHOWN_SCORE = 0.5


def collect_detection(
    trainer: Any, model: Any, loader: Any, max_batches: int | None, worst: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report's numbers of a :class:`~medexp.tasks.detection.DetectionTask` over ``loader``,
    and its ``worst`` cases as ``{case, image (2D), true_boxes, found_boxes, scores, counts}`` for the overlays."""
    from medexp.inference.loop import prediction_pass
    from medexp.metrics.detection import DetectionMetrics, count_matches

    hp = model.hparams
    metric = DetectionMetrics(
        model.num_classes,
        model.spatial_dims,
        map_iou=hp.map_iou,
        froc_iou=hp.froc_iou,
        froc_rates=hp.froc_rates,
        max_detections=hp.detections_per_image,
    )
    per_case: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []

    def visit(outputs: Any, probs: torch.Tensor, batch: dict[str, Any]) -> None:
        targets = model.targets(batch)
        found = [{key: value.detach().cpu() for key, value in d.items()} for d in outputs.detections]
        truths = [{key: value.cpu() for key, value in t.items()} for t in targets]
        metric.update(found, truths)
        for image, f, t in zip(batch[model.input_key][:, 0].float().cpu().numpy(), found, truths):
            counts = count_matches(f, t, hp.froc_iou, SHOWN_SCORE)
            per_case.append({"case": len(per_case), **counts})
            shown = f["labels_scores"] >= SHOWN_SCORE
            cases.append(
                {
                    "case": per_case[-1]["case"],
                    "image": image,
                    "true_boxes": t["boxes"].numpy(),
                    "found_boxes": f["boxes"][shown].numpy(),
                    "scores": f["labels_scores"][shown].numpy(),
                    **counts,
                }
            )
            # keep the worst so far only: images are held until the pass ends
            cases.sort(key=lambda c: (-(c["missed"] + c["false_positives"]), c["case"]))
            del cases[worst:]

    prediction_pass(trainer, model, loader, max_batches, visit)
    values, fps, sensitivity = metric.evaluate()
    totals = {key: int(sum(row[key] for row in per_case)) for key in ("lesions", "found", "missed", "false_positives")}
    numbers = {
        "n": len(per_case),
        "metrics": values,
        "froc_curve": {"fps_per_image": fps.tolist(), "sensitivity": sensitivity.tolist()},
        "shown_score": SHOWN_SCORE,
        "totals": totals,
        "per_case": per_case,
        "worst_cases": [
            {key: c[key] for key in ("case", "lesions", "found", "missed", "false_positives")} for c in cases
        ],
        "notes": (
            f"map_<iou>: COCO-style AP at that IoU; froc: mean sensitivity at {list(hp.froc_rates)} false positives "
            f"per image, a hit at IoU >= {hp.froc_iou}; per-case counts and overlays: detections scoring >= "
            f"{SHOWN_SCORE}; case: the index in the split's loader order"
        ),
    }
    return numbers, [_flatten(case, model.spatial_dims) for case in cases]


def _flatten(case: dict[str, Any], dims: int) -> dict[str, Any]:
    """A 3D case as the slice (first axis) through the middle of its largest box, with the boxes
    that cross it in the slice's two axes; 2D cases as they are."""
    if dims == 2:
        return case
    truth, found = case["true_boxes"], case["found_boxes"]
    boxes = np.concatenate([truth, found])
    if len(boxes):
        largest = boxes[np.argmax(np.prod(boxes[:, 3:] - boxes[:, :3], axis=1))]
        index = int((largest[0] + largest[3]) // 2)
    else:
        index = case["image"].shape[0] // 2

    def crossing(b: np.ndarray) -> np.ndarray:
        return (b[:, 0] <= index) & (index < b[:, 3])

    return {
        **case,
        "image": case["image"][index],
        "true_boxes": truth[crossing(truth)][:, [1, 2, 4, 5]],
        "found_boxes": found[crossing(found)][:, [1, 2, 4, 5]],
        "scores": case["scores"][crossing(found)],
    }


def detection_figures(out: Path, report: dict[str, Any], cases: list[dict[str, Any]]) -> list[Path]:
    """``froc.png`` and, when there are cases, ``worst_cases.png``."""
    from matplotlib.patches import Rectangle

    from medexp.reports.figures import pyplot, save_figure

    plt = pyplot()
    curve = report["froc_curve"]
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.step(np.maximum(curve["fps_per_image"], 1e-3), curve["sensitivity"], where="post", color="tab:blue")
    rates = [float(name.removeprefix("sens_fp")) for name in report["metrics"] if name.startswith("sens_fp")]
    values = [report["metrics"][f"sens_fp{rate:g}"] for rate in rates]
    axis.plot(rates, values, "o", color="tab:red", label=f"FROC score {report['metrics']['froc']:.3f}")
    axis.set_xscale("log")
    axis.set_xlim(min(rates, default=0.1) / 2, max(rates, default=10) * 2)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("false positives per image")
    axis.set_ylabel("sensitivity")
    axis.legend(loc="lower right")
    figures = [save_figure(figure, out / "froc.png")]
    if not cases:
        return figures
    figure, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 3.4), squeeze=False)
    for axis, case in zip(axes[0], cases):
        axis.imshow(case["image"], cmap="gray")
        for boxes, colour in ((case["true_boxes"], "lime"), (case["found_boxes"], "red")):
            for box in boxes:  # [min_row, min_col, max_row, max_col]: pixel k spans k - 0.5 .. k + 0.5 on screen
                axis.add_patch(
                    Rectangle(
                        (box[1] - 0.5, box[0] - 0.5),
                        box[3] - box[1],
                        box[2] - box[0],
                        fill=False,
                        edgecolor=colour,
                        linewidth=1,
                    )
                )
        for box, score in zip(case["found_boxes"], case["scores"]):
            axis.text(box[1] - 0.5, box[0] - 1.5, f"{score:.2f}", color="red", fontsize=7)
        axis.set_title(f"case {case['case']}: {case['missed']} missed, {case['false_positives']} FP", fontsize=9)
        axis.set_axis_off()
    figure.suptitle(f"worst cases (truth: green, detections >= {report['shown_score']}: red)", fontsize=9)
    figures.append(save_figure(figure, out / "worst_cases.png"))
    return figures


def detection_blocks(report: dict[str, Any], images: dict[str, str], recorded: Any) -> list[tuple]:
    """The report's sections after its title (see :func:`medexp.reports.render._blocks`)."""
    from medexp.reports.tables import number_text

    metrics, totals = report["metrics"], report["totals"]
    return [
        ("h2", "Summary"),
        (
            "table",
            ["metric", "value", "metrics.json"],
            [[name, number_text(value), recorded(name)] for name, value in metrics.items()],
        ),
        (
            "p",
            f"At score >= {report['shown_score']}: {totals['found']} of {totals['lesions']} lesions found, "
            f"{totals['missed']} missed, {totals['false_positives']} false positives in {report['n']} images.",
        ),
        ("p", report["notes"]),
        ("h2", "FROC"),
        ("img", images.get("froc"), "FROC curve"),
        ("h2", "Worst cases"),
        (
            "table",
            ["case", "lesions", "found", "missed", "false positives"],
            [[c["case"], c["lesions"], c["found"], c["missed"], c["false_positives"]] for c in report["worst_cases"]],
        ),
        ("img", images.get("worst_cases"), "worst cases"),
    ]
