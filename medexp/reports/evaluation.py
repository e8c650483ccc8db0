"""The evaluation report of a checkpoint on one split (classification, segmentation, detection, translation).

:func:`write_report` runs one prediction pass over the split (the test split by default) with
the model as it stands (after ``trainer.test(ckpt_path=best)``: the best checkpoint), on the
trainer's device and precision and the same batches as the trainer's test loop (with the test's
BatchNorm adaptation, ``callbacks.bn_adapt``, where it ran: :func:`_test_time_adaptation`), and writes
``<dir>/report.json`` (the numbers), PNG figures, ``report.md`` (linking them) and a
self-contained ``report.html`` (figures embedded), and sends the figures to the trainer's loggers
(:func:`medexp.utils.loggers.send_picture`: remote loggers only with ``logger.log_images=true``).

Classification (binary, multi-class, multi-label), computed with torchmetrics on the same
probabilities the test metrics see, so they equal ``metrics.json``'s:

- accuracy (multi-class: micro; multi-label: mean over labels at 0.5) and AUROC (macro over
  classes one-vs-rest, or over labels), each with a percentile bootstrap 95% confidence interval
  (``n_boot`` resamples of the cases with replacement, drawn from ``seed``); a class without
  positives or without negatives in the split has no AUROC (undefined: NaN, null in
  ``report.json``) and is left out of the macro AUROC, which with no class left is undefined, its
  interval too;
- per class (label): precision, recall, F1 (argmax; multi-label: threshold 0.5), support (cases
  of the class; multi-label: positives), AUROC and average precision; the confusion matrix
  (multi-label: one 2x2 matrix per label); ROC and precision-recall curves one-vs-rest
  (binary: the positive class);
- per site, where the data name acquisition sites (``site_names``, batches carrying ``site``):
  cases and the task's metrics (:func:`site_numbers`), equal to the ``test/site_<name>/...``
  metrics;
- calibration: ECE with 15 bins (top-label for binary and multi-class, mean per-label ECE for
  multi-label; see :func:`medexp.reports.calibration.ece`), NLL and a reliability diagram, with
  the model's temperature and without it (``T = 1``), plus the fit on the validation split when
  the model was calibrated (``model.calibrate=true``).

Segmentation: per case Dice (the test metric's, per case: mean over foreground classes; cases
with an empty truth and an empty prediction have none) and HD95 (as
:class:`~medexp.tasks.segmentation.HausdorffDistance95`), their distributions, the means that
equal the test metrics, and overlays of the ``worst`` cases by Dice.

Detection: mAP and FROC (equal to the test metrics), the FROC curve, per-image counts of lesions
found and missed and of false positives, and box overlays of the ``worst`` cases (see
:mod:`medexp.reports.detection`).

Image-to-image translation: MAE, PSNR and SSIM of the translated images against their targets
and of the sources themselves (the identity baseline), and source | translated | target |
difference of the ``worst`` cases by MAE and the median case (see :mod:`medexp.reports.translation`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medexp.inference.loop import batch_limit
from medexp.reports import calibration as cal

log = logging.getLogger("medexp")

N_BOOT = 1000
BOOT_SEED = 0
# the report kinds a task may declare (its ``report_kind``)
REPORT_KINDS = ("classification", "segmentation", "detection", "translation")
WORST_CASES = 4


# --------------------------------------------------------------------------------------------
# bootstrap


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC (the Mann-Whitney statistic, ties counting a half) of ``scores`` for the 0/1 truth
    ``positive`` under each row of case ``weights`` ``(B, n)``; NaN where a row has no positive
    or no negative. With all weights 1 it is the usual AUROC."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    pos = positive[order].astype(bool)
    w = weights[:, order]
    pos_group = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    neg_group = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(neg_group, axis=1) - neg_group
    pairs = (pos_group * (neg_below + 0.5 * neg_group)).sum(axis=1)
    total = pos_group.sum(axis=1) * neg_group.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, pairs / np.where(total > 0, total, 1.0), np.nan)


def _macro_auroc(probs: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro AUROC over the columns (one-vs-rest classes or labels) of ``truth`` (0/1, ``(n, C)``)
    under each row of case ``weights``.

    A class without positives or without negatives (in the whole split, or only in a resample)
    is left out of the mean, as the test metric leaves it out
    (:class:`~medexp.metrics.classification.MulticlassDefinedAUROC`); NaN where no class is left.
    """
    per_class = np.stack([weighted_auroc(probs[:, c], truth[:, c], weights) for c in range(probs.shape[1])], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any class to score: NaN
        return np.nanmean(per_class, axis=1)


def _interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_classification(
    probs: torch.Tensor, targets: torch.Tensor, task: str, n_boot: int = N_BOOT, seed: int = BOOT_SEED
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap 95% intervals of accuracy and macro AUROC: ``{name: (low, high)}``.

    Accuracy per resample is the weighted mean of each case's correctness (multi-label: the share
    of its labels right at 0.5), AUROC the weighted Mann-Whitney statistic per class
    (:func:`weighted_auroc`); both equal torchmetrics' values with all weights 1. Resamples are
    processed in chunks, so memory stays bounded for large splits.
    """
    p = probs.double().numpy()
    n = len(p)
    if task == "multilabel":
        truth = targets.numpy().astype(bool)
        correct = ((p > 0.5) == truth).mean(axis=1)
    else:
        labels = targets.long().numpy()
        truth = np.eye(p.shape[1], dtype=bool)[labels]
        correct = (p.argmax(axis=1) == labels).astype(np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(n, 1))
    accuracy, auroc = [], []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        accuracy.append(weights @ correct / n)
        auroc.append(_macro_auroc(p, truth, weights))
    return {"accuracy": _interval(np.concatenate(accuracy)), "auroc": _interval(np.concatenate(auroc))}


# --------------------------------------------------------------------------------------------
# classification


def _names(datamodule: Any, count: int) -> list[str]:
    names = getattr(datamodule, "class_names", None)
    if names and len(names) == count:
        return [str(name) for name in names]
    return [str(index) for index in range(count)]


def classification_numbers(
    probs: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    class_names: list[str],
    temperature: float = 1.0,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The numbers of a classification report, and the curves for its figures."""
    with warnings.catch_warnings():
        # a class without positives (negatives) in the split: torchmetrics warns and scores it 0;
        # its AUROC (AP) is made undefined below, as in the test metrics
        warnings.filterwarnings("ignore", message="No (positive|negative) samples (found )?in target")
        return _classification_numbers(probs, logits, targets, task, class_names, temperature, n_boot, seed)


def _classification_numbers(
    probs: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    task: str,
    class_names: list[str],
    temperature: float,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    import torchmetrics.functional.classification as tmf

    n_classes = probs.shape[1]
    t = targets.long()
    # torchmetrics' task-generic functions; binary tasks are two-class softmax outputs here
    kind = (
        {"task": "multilabel", "num_labels": n_classes}
        if task == "multilabel"
        else {"task": "multiclass", "num_classes": n_classes}
    )

    def metric(name: str, **kwargs: Any) -> Any:
        return getattr(tmf, name)(probs, t, **kind, **kwargs)

    # accuracy: of every label decision (multi-label, macro over labels) or of every case
    accuracy = metric("accuracy", average="macro" if task == "multilabel" else "micro")
    precision, recall, f1 = (metric(name, average="none") for name in ("precision", "recall", "f1_score"))
    support = t.sum(dim=0) if task == "multilabel" else torch.bincount(t, minlength=n_classes)
    # AUROC is undefined for a class without positives or without negatives, AP without positives:
    # NaN (null in report.json, "undefined" in the documents), and the macro AUROC is the mean over
    # the classes where it is defined, as the test metric (medexp.metrics.classification)
    nan = torch.tensor(float("nan"))
    per_auroc = torch.where((support > 0) & (support < len(t)), metric("auroc", average="none").float(), nan)
    per_ap = torch.where(support > 0, metric("average_precision", average="none").float(), nan)
    defined = ~per_auroc.isnan()
    auroc = per_auroc[defined].mean() if defined.any() else nan
    confusion = metric("confusion_matrix")
    roc = metric("roc")
    pr = metric("precision_recall_curve")
    extra = {} if task == "multilabel" else {"balanced_accuracy": float(recall.mean())}
    intervals = bootstrap_classification(probs, targets, task, n_boot, seed)

    def with_interval(name: str, value: torch.Tensor) -> dict[str, float]:
        low, high = intervals[name]
        return {"value": float(value), "ci_low": low, "ci_high": high}

    before = cal.probabilities(logits, task)
    calibration = {
        "ece_kind": cal.ECE_KIND[task],
        "n_bins": cal.N_BINS,
        "temperature": float(temperature),
        "ece": cal.ece(probs, targets, task),
        "nll": float(cal.nll(logits.double(), targets, task, temperature)),
        "ece_uncalibrated": cal.ece(before, targets, task),
        "nll_uncalibrated": float(cal.nll(logits.double(), targets, task, 1.0)),
        "reliability": cal.reliability_bins(probs, targets, task),
        "reliability_uncalibrated": cal.reliability_bins(before, targets, task),
    }
    per_class = [
        {
            "class": name,
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
            "auroc": float(per_auroc[c]),
            "average_precision": float(per_ap[c]),
        }
        for c, name in enumerate(class_names)
    ]
    numbers = {
        "n": int(len(targets)),
        "classes": class_names,
        "metrics": {
            "accuracy": with_interval("accuracy", accuracy),
            "auroc": with_interval("auroc", auroc),
            **extra,
            "f1_macro": float(f1.mean()),
        },
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_layout": (
            "per label [[TN, FP], [FN, TP]] at 0.5" if task == "multilabel" else "rows: true class, columns: predicted"
        ),
        "calibration": calibration,
        "bootstrap": {"n_resamples": n_boot, "seed": seed, "method": "percentile, cases resampled with replacement"},
    }
    curves = {
        "roc": [(fpr.numpy(), tpr.numpy()) for fpr, tpr in zip(roc[0], roc[1])],
        "pr": [(rec.numpy(), prec.numpy()) for prec, rec in zip(pr[0], pr[1])],
        "prevalence": [float(s) / max(1, len(targets)) for s in support],
    }
    return numbers, curves


def site_numbers(
    probs: torch.Tensor, targets: torch.Tensor, sites: torch.Tensor, site_names: list[str], metrics: Any
) -> list[dict[str, Any]]:
    """Per site (acquisition site, scanner): its cases and ``metrics`` on them.

    Args:
        probs, targets: as the test metrics take them, ``(N, C)`` and ``(N,)`` (multi-label ``(N, C)``).
        sites: ``(N,)`` site index of each case (into ``site_names``).
        metrics: a fresh copy of the task's metric collection (``configure_metrics()``), so the
            numbers are those of the ``test/site_<name>/...`` metrics.

    Returns:
        One row per site with cases in the split: ``site``, ``n`` and each metric.
    """
    rows = []
    for index, name in enumerate(site_names):
        chosen = sites == index
        if not chosen.any():
            continue
        metrics.reset()
        metrics.update(probs[chosen], targets[chosen])
        rows.append(
            {"site": name, "n": int(chosen.sum()), **{key: float(value) for key, value in metrics.compute().items()}}
        )
    return rows


# --------------------------------------------------------------------------------------------
# segmentation


def _collect_segmentation(
    trainer: Any, model: Any, loader: Any, max_batches: int | None, worst: int
) -> tuple[list[float], list[float], list[int], list[tuple]]:
    """Per case Dice, HD95 sum and count over foreground classes (see HausdorffDistance95), and
    the ``worst`` cases by Dice as ``(dice, index, image 2D, truth 2D, prediction 2D)``."""
    from torchmetrics.functional.segmentation import dice_score

    from medexp.callbacks.overlays import middle_slice
    from medexp.tasks.segmentation import HausdorffDistance95

    n_classes = model.num_classes
    hd95 = HausdorffDistance95(n_classes)
    dice_all: list[float] = []
    hd_sum: list[float] = []
    hd_count: list[int] = []
    heap: list[tuple] = []  # the worst cases so far, as a max-heap on Dice (negated)

    def visit(outputs: torch.Tensor, probs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        preds = probs.argmax(dim=1)
        target = batch[model.target_key][:, 0].long()
        roi = batch.get(getattr(model, "roi_key", "roi"))
        if roi is not None:  # as SegmentationTask.update_metrics: only the pixels inside count
            inside = roi[:, 0].bool()
            preds = torch.where(inside, preds, torch.zeros_like(preds))
            target = torch.where(inside, target, torch.zeros_like(target))
        dice = dice_score(
            preds,
            target,
            n_classes,
            include_background=False,
            average="macro",
            input_format="index",
            aggregation_level="samplewise",
        ).cpu()
        preds_cpu, target_cpu = preds.cpu(), target.cpu()
        images = batch[model.input_key][:, 0].float().cpu().numpy()
        for i in range(len(preds_cpu)):
            hd95.reset()
            hd95.update(preds_cpu[i : i + 1], target_cpu[i : i + 1])
            index = len(dice_all)
            value = float(dice[i])
            dice_all.append(value)
            hd_sum.append(float(hd95.total))
            hd_count.append(int(hd95.count))
            if math.isnan(value):
                continue
            truth_np, pred_np = target_cpu[i].numpy(), preds_cpu[i].numpy()
            # 3D: the slice with the most truth, or, for a phantom lesion, the most prediction
            guide = truth_np if truth_np.any() else pred_np
            image_2d, _ = middle_slice(images[i], guide)
            truth_2d, _ = middle_slice(truth_np, guide)
            pred_2d, _ = middle_slice(pred_np, guide)
            item = (-value, -index, index, image_2d, truth_2d, pred_2d)
            if len(heap) < worst:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)

    from medexp.inference.loop import prediction_pass

    prediction_pass(trainer, model, loader, max_batches, visit)
    cases = sorted(((-item[0], item[2], *item[3:]) for item in heap), key=lambda case: (case[0], case[1]))
    return dice_all, hd_sum, hd_count, cases


def segmentation_numbers(
    dice: list[float], hd_sum: list[float], hd_count: list[int], cases: list[tuple]
) -> dict[str, Any]:
    dice_np = np.asarray(dice, dtype=np.float64)
    hd_case = [s / c if c else float("nan") for s, c in zip(hd_sum, hd_count)]
    finite = dice_np[np.isfinite(dice_np)]
    total_count = sum(hd_count)

    def summary(values: np.ndarray) -> dict[str, float]:
        values = values[np.isfinite(values)]
        if values.size == 0:
            return {"n": 0}
        q = np.percentile(values, [0, 25, 50, 75, 100])
        return {
            "n": int(values.size),
            "mean": float(values.mean()),
            **dict(zip(("min", "q1", "median", "q3", "max"), map(float, q))),
        }

    return {
        "n": len(dice),
        "metrics": {
            # the test metrics: Dice's mean over cases that have one; HD95 over (case, class) pairs
            "dice": float(finite.mean()) if finite.size else float("nan"),
            "hd95": float(sum(hd_sum) / total_count) if total_count else float("nan"),
        },
        "dice_summary": summary(dice_np),
        "hd95_summary": summary(np.asarray(hd_case, dtype=np.float64)),
        "per_case": [{"case": i, "dice": d, "hd95": h} for i, (d, h) in enumerate(zip(dice, hd_case))],
        "worst_cases": [{"case": case[1], "dice": case[0], "hd95": hd_case[case[1]]} for case in cases],
        "notes": (
            "case: the index in the split's loader order; dice: mean over foreground classes, none for a case "
            "with an empty truth and an empty prediction; hd95 in pixels (voxels), a class present in only one "
            "of truth and prediction counting as the image diagonal"
        ),
    }


# --------------------------------------------------------------------------------------------
# the report


# the report's numbers that the task's test metrics also compute: report name -> metric name
AGREEING = {
    "accuracy": "accuracy",
    "auroc": "auroc",
    "balanced_accuracy": "balanced_accuracy",
    "f1_macro": "f1",
    "dice": "dice",
    "hd95": "hd95",
    "map_10": "map_10",
    "map_50": "map_50",
    "froc": "froc",
    # translation (medexp.reports.translation): translated vs target, and the source's baseline
    **{f"{name}{suffix}": f"{name}{suffix}" for name in ("mae", "psnr", "ssim") for suffix in ("", "_source")},
}


def _agreement(numbers: dict[str, Any], metrics: dict[str, Any] | None, split: str) -> dict[str, Any]:
    if not metrics:
        return {}
    agreement = {}
    for name, recorded_name in AGREEING.items():
        key = f"{split}/{recorded_name}"
        if name not in numbers["metrics"] or metrics.get(key) is None:
            continue
        value = numbers["metrics"][name]
        value = value["value"] if isinstance(value, dict) else value
        recorded = float(metrics[key])
        diff = _difference(value, recorded)
        agreement[name] = {"metric": key, "report": value, "metrics": recorded, "abs_diff": diff}
        if not diff <= 1e-4 * max(1.0, abs(recorded)):
            log.warning("report: %s is %.6g but the %s metrics recorded %.6g", name, value, split, recorded)
    for row in numbers.get("per_site", []):
        key = f"{split}/site_{row['site']}/auroc"
        if metrics.get(key) is not None:
            recorded = float(metrics[key])
            agreement[f"site_{row['site']}/auroc"] = {
                "metric": key,
                "report": row["auroc"],
                "metrics": recorded,
                "abs_diff": _difference(row["auroc"], recorded),
            }
    return agreement


def _difference(report: float, recorded: float) -> float:
    """How far the report's value is from the recorded metric's: 0 where both are undefined (NaN)."""
    if math.isnan(report) and math.isnan(recorded):
        return 0.0
    return abs(report - recorded)


def _test_time_adaptation(trainer: Any, model: Any, split: str) -> contextlib.AbstractContextManager:
    """The trainer's test-time adaptation (:mod:`medexp.callbacks.adaptation`) of the test just
    run, so the report scores the model the test metrics scored; nothing for other splits."""
    from medexp.callbacks.adaptation import BatchNormAdaptation

    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, BatchNormAdaptation) and split == "test":
            return callback.applied(model)
    return contextlib.nullcontext()


def write_report(
    trainer: Any,
    model: Any,
    datamodule: Any,
    out_dir: str | Path,
    split: str = "test",
    metrics: dict[str, Any] | None = None,
    remote_images: bool = False,
    calibration: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
    worst: int = WORST_CASES,
) -> dict[str, Any] | None:
    """Write the evaluation report of ``model`` on ``split`` into ``out_dir`` (see the module).

    Args:
        trainer: gives the device, precision, batch limit and the loggers the figures go to; may
            be None (CPU, full precision, every batch, no loggers).
        metrics: the split's metrics from the trainer (``{"test/auroc": ...}``), compared with
            the report's under ``agreement`` (a warning when they differ).
        remote_images: send the figures to remote loggers too (``logger.log_images``).
        calibration: the record of a temperature fit (:func:`~medexp.reports.calibration.calibrate_checkpoint`).
        checkpoint: the checkpoint evaluated, for the record.

    Returns:
        The contents of ``report.json``, or None for tasks without a report (reconstruction, GANs).
    """
    from medexp.reports import render

    kind = getattr(model, "report_kind", None)  # what the task declares
    if kind not in REPORT_KINDS:
        log.info("no evaluation report for %s (%s only)", type(model).__name__, ", ".join(REPORT_KINDS))
        return None
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    limit = batch_limit(trainer, split, loader)
    report: dict[str, Any] = {"split": split, "checkpoint": checkpoint, "model": type(model).__name__}
    if kind == "classification":
        with _test_time_adaptation(trainer, model, split):
            logits, probs, targets, sites = cal.collect_classification(trainer, model, loader, limit)
        temperature = float(model.temperature)
        names = _names(datamodule, model.num_classes)
        numbers, curves = classification_numbers(probs, logits, targets, model.task, names, temperature, n_boot, seed)
        report.update(task=model.task, **numbers)
        site_names = getattr(datamodule, "site_names", None)
        if sites is not None and site_names:
            with warnings.catch_warnings():  # a site without one of the classes: scored 0, as the test metrics
                warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
                report["per_site"] = site_numbers(probs, targets, sites, list(site_names), model.configure_metrics())
        if calibration:
            report["calibration"]["fit"] = calibration
        figures = render.classification_figures(out, report, curves)
    elif kind == "detection":
        from medexp.reports.detection import collect_detection, detection_figures

        numbers, cases = collect_detection(trainer, model, loader, limit, worst)
        report.update(task="detection", **numbers)
        figures = detection_figures(out, report, cases)
    elif kind == "translation":
        from medexp.reports.translation import collect_translation, translation_figures

        numbers, cases = collect_translation(trainer, model, datamodule, loader, limit, worst)
        report.update(task="translation", **numbers)
        figures = translation_figures(out, report, cases)
    else:
        with _test_time_adaptation(trainer, model, split):
            dice, hd_sum, hd_count, cases = _collect_segmentation(trainer, model, loader, limit, worst)
        report.update(task="segmentation", **segmentation_numbers(dice, hd_sum, hd_count, cases))
        figures = render.segmentation_figures(out, report, cases)
    report["agreement"] = _agreement(report, metrics, split)
    report["figures"] = [path.name for path in figures]
    report["seconds"] = round(time.perf_counter() - start, 3)
    render.write_documents(out, report, figures)
    if trainer is not None:
        from medexp.utils.loggers import send_picture

        noted = False
        for path in figures:
            noted = send_picture(trainer, f"report/{path.stem}", path, remote_images, noted)
    log.info("evaluation report: %s (%.1f s)", out, time.perf_counter() - start)
    return report
