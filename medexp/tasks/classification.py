"""Image classification: binary, multi-class and multi-label."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import (
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
    MultilabelAccuracy,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
    MultilabelSpecificity,
)
from torchmetrics.wrappers import LambdaInputTransformer

from medexp.data.batch_augment import check_axes, mix, tta_views
from medexp.metrics.classification import MulticlassDefinedAUROC, MultilabelDefinedAUROC
from medexp.tasks.base import BaseTask
from medexp.utils.errors import MedexpError

log = logging.getLogger("medexp")

TASKS = ("binary", "multiclass", "multilabel")
LOSSES = ("ce", "focal")


def check_tta(flips: bool | Sequence[int] | None, pixels: int) -> None:
    """Check ``model.tta_flips`` (true: every spatial axis; a list of axes; false/null/[]: none)
    and ``model.tta_shift`` (whole pixels >= 0).

    Raises:
        MedexpError: naming the key and what would be valid.
    """
    if not isinstance(flips, bool) and flips is not None:
        check_axes(flips, 3, "model.tta_flips")
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
        raise MedexpError(f"model.tta_shift={pixels!r}; expected a whole number of pixels >= 0 (0: no shifts)")


def positive_class(probs: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` class probabilities -> ``(B,)`` probability of class 1."""
    return probs[:, 1]


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    multilabel: bool,
    gamma: float,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017): each sample's cross-entropy (each label's BCE) scaled by
    ``(1 - p_t) ** gamma``, ``p_t`` the probability given to the true class (label value), so
    confident, easy samples count less and rare, hard ones more.

    Built on PyTorch's cross-entropy rather than MONAI's ``FocalLoss``: MONAI averages over
    batch x classes and weights classes per element, so neither its scale nor its class weights
    match :func:`torch.nn.functional.cross_entropy`'s; here ``gamma=0`` is exactly the task's
    cross-entropy, class weights, label smoothing and reduction included. Without weights and
    smoothing it equals MONAI's per-sample focal loss summed over classes.

    Args:
        logits: ``(B, C)``.
        target: ``(B,)`` class indices (softmax over classes), or ``(B, C)`` 0/1 labels with
            ``multilabel`` (a sigmoid per label).
        gamma: the focusing exponent, at least 0.
        weight: ``(C,)`` class weights (softmax; the mean is over the weights of the targets,
            as PyTorch's), or positive-label weights (``pos_weight``, multi-label).
        label_smoothing: as in the cross-entropy; multi-label targets become ``t(1 - s) + s/2``.

    Returns:
        The mean loss, a scalar.
    """
    if multilabel:
        soft = target.float() * (1 - label_smoothing) + 0.5 * label_smoothing
        loss = F.binary_cross_entropy_with_logits(logits, soft, pos_weight=weight, reduction="none")
        # 1 - p_t in log space, stable for large logits: sigmoid(-x) for t=1, sigmoid(x) for t=0
        return (torch.exp(gamma * F.logsigmoid(-logits * (2 * soft - 1))) * loss).mean()
    loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction="none")
    if gamma > 0:  # (1 - p) ** 0 is 1 but its gradient is NaN where p = 1: no factor at all
        p_true = logits.softmax(dim=1).gather(1, target[:, None])[:, 0]
        loss = (1 - p_true).clamp_min(torch.finfo(p_true.dtype).tiny).pow(gamma) * loss
    return loss.sum() / (weight[target].sum() if weight is not None else len(target))


def ordinal_targets(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label smoothing for ordered grades: ``(B,)`` grades -> ``(B, C)`` soft targets, ``1 - s`` on
    the grade plus ``s`` spread over all grades in proportion to ``exp(-|k - grade|)``, so a
    neighbouring grade gets more of it than a distant one. Uniform weights instead of
    ``exp(-|k - grade|)`` would give PyTorch's ``label_smoothing``."""
    grades = torch.arange(num_classes, device=target.device)
    near = torch.exp(-(grades[None, :] - target[:, None]).abs().float())
    return (1 - smoothing) * F.one_hot(target, num_classes).float() + smoothing * near / near.sum(1, keepdim=True)


def ordinal_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, smoothing: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The cross-entropy of ``(B, C)`` logits against :func:`ordinal_targets`; with class weights,
    each sample's loss is weighted by its grade's weight and the mean is over those weights."""
    loss = -(ordinal_targets(target, logits.shape[1], smoothing) * logits.log_softmax(dim=1)).sum(dim=1)
    if weight is None:
        return loss.mean()
    return (weight[target] * loss).sum() / weight[target].sum()


class ClassificationTask(BaseTask):
    """Classify images into classes (softmax over ``num_classes`` outputs, also for binary
    tasks, as in MedMNIST v2) or into independent labels (sigmoid, multi-label).

    Temperature scaling: :meth:`postprocess` divides the logits by the buffer ``temperature``
    (a scalar, 1 unless fitted; one for all classes or labels), which checkpoints keep, so the
    probabilities of validation, test and ``medexp predict`` are the calibrated ones. Accuracy
    does not change with it (nor, for binary and multi-label tasks, AUROC).

    Metrics: accuracy, balanced accuracy (macro recall; binary/multi-class), AUROC (one-vs-rest,
    macro), F1, precision, recall and specificity (macro), and for binary tasks the positive
    class's ``sensitivity``, ``specificity`` and ``precision``.

    Args:
        net: ``(B, C, *spatial)`` -> ``(B, num_classes)`` logits.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        num_classes: classes (2 for binary) or labels (multi-label).
        class_weights: None, ``"auto"`` (inverse class frequency of the training labels,
            ``n / (num_classes * n_c)``; for multi-label the positive weight ``negatives / positives``)
            or one weight per class.
        label_smoothing: in [0, 1).
        ordinal_smoothing: the classes are ordered grades (diabetic retinopathy, Kellgren-Lawrence):
            label smoothing spreads to the neighbouring grades more than to distant ones
            (:func:`ordinal_targets`); cross-entropy of binary or multi-class tasks only.
        loss: ``ce`` (cross-entropy; BCE for multi-label) or ``focal`` (see :func:`focal_loss`).
        focal_gamma: the focal loss's focusing exponent (0: cross-entropy).
        mixup_alpha, cutmix_alpha: mixup / CutMix of training batches with ``lam ~ Beta(alpha,
            alpha)`` (0: off; both on: one of the two per batch), on a share ``mix_prob`` of the
            batches; see :func:`medexp.data.batch_augment.mix`. Training metrics then score the
            mixed images against their first labels.
        tta_flips, tta_shift: test-time augmentation of validation, test, eval and predict: the
            logits averaged over the views of :func:`medexp.data.batch_augment.tta_views`, every
            combination of mirrors along ``tta_flips`` (spatial axes; true: all of them) and, with
            ``tta_shift`` > 0, those views shifted by +-``tta_shift`` pixels too.
        calibrate: after training, fit a temperature on the validation set (``medexp train``
            does it; see :func:`medexp.reports.calibration.calibrate_checkpoint`).
        **kwargs: ``optimizer``, ``scheduler``, ``monitor``; see :class:`~medexp.tasks.base.BaseTask`.

    Sites: when the data module names acquisition sites (``site_names``) and batches carry each
    sample's ``site`` index, the test metrics are also computed per site, logged as
    ``test/site_<name>/<metric>`` with the site's case count ``test/site_<name>/n``.
    """

    # the data.task values this task trains on (checked before anything is built)
    data_tasks = ("binary", "multiclass", "multilabel")
    measures_features = True
    # what it does besides training (see BaseTask)
    prediction_writer = "table"
    sampled_predictions = True
    report_kind = "classification"
    not_exported = None
    explainable = True

    def __init__(
        self,
        net: torch.nn.Module,
        task: str,
        num_classes: int,
        class_weights: str | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        ordinal_smoothing: bool = False,
        calibrate: bool = False,
        monitor: str = "val/auroc",
        loss: str = "ce",
        focal_gamma: float = 2.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        tta_flips: bool | Sequence[int] | None = None,
        tta_shift: int = 0,
        **kwargs: Any,
    ) -> None:
        if task == "segmentation":
            raise MedexpError(
                "data.task=segmentation needs a segmentation model, e.g. model=unet; this model classifies"
            )
        if task not in TASKS:
            raise MedexpError(f"model.task={task!r}; expected one of {list(TASKS)}")
        if num_classes < 2 or (task == "binary" and num_classes != 2):
            raise MedexpError(f"model.num_classes={num_classes} does not fit task={task!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise MedexpError(f"model.label_smoothing={label_smoothing}; expected a value in [0, 1)")
        if ordinal_smoothing and (task == "multilabel" or loss != "ce"):
            raise MedexpError(
                f"model.ordinal_smoothing=true needs ordered classes and model.loss=ce; got task={task!r}, "
                f"loss={loss!r} (set model.ordinal_smoothing=false)"
            )
        if isinstance(class_weights, str) and class_weights != "auto":
            raise MedexpError(f"model.class_weights={class_weights!r}; expected null, auto or a list of numbers")
        if class_weights is not None and not isinstance(class_weights, str) and len(class_weights) != num_classes:
            raise MedexpError(f"model.class_weights has {len(class_weights)} values; expected {num_classes}")
        if loss not in LOSSES:
            raise MedexpError(f"model.loss={loss!r}; expected one of {list(LOSSES)} for a classifier")
        if isinstance(focal_gamma, bool) or not isinstance(focal_gamma, int | float) or focal_gamma < 0:
            raise MedexpError(
                f"model.focal_gamma={focal_gamma!r}; expected a number >= 0 (2 is usual, 0 is cross-entropy)"
            )
        for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise MedexpError(f"model.{key}={value!r}; expected a number >= 0 (0: off; 0.2-1 is usual)")
        if not 0.0 <= mix_prob <= 1.0:
            raise MedexpError(f"model.mix_prob={mix_prob!r}; expected a probability in [0, 1]")
        check_tta(tta_flips, tta_shift)
        self.task, self.num_classes = task, num_classes
        super().__init__(net, monitor=monitor, **kwargs)
        # not in hparams: BaseTask leaves "loss" out (other tasks inject loss modules there)
        self.loss_kind = loss
        # per-site test metrics, built in setup() when the data name their sites
        self.site_names: list[str] | None = None
        self.test_site_metrics: nn.ModuleDict | None = None
        self.test_site_counts: nn.ModuleDict | None = None
        # the site index of each sample of the batch being evaluated (None: the data have no
        # sites), read by per-site test-time adaptation (medexp.callbacks.adaptation)
        self.current_sites: torch.Tensor | None = None
        # set in setup(): "auto" needs the training labels. A plain tensor, not a buffer: it is
        # not the model's state, and a buffer appearing in setup() would not line up with the
        # copy that weight averaging (callbacks.ema) takes of the module before it
        self.class_weight: torch.Tensor | None = None
        # temperature scaling (Guo et al., 2017): fitted after training when calibrate=true
        self.register_buffer("temperature", torch.ones(()))
        # (where, undefined classes) already warned about: once per split, not every epoch
        self._undefined_warned: set[tuple[str, tuple[int, ...]]] = set()

    @property
    def ensemble_combine(self) -> str:
        """model.ensemble averages the members' probabilities: per label (multi-label) or over classes."""
        return "sigmoid" if self.task == "multilabel" else "softmax"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints from before temperature scaling existed have no temperature: 1
        state_dict.setdefault(f"{prefix}temperature", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def configure_metrics(self) -> MetricCollection:
        n = self.num_classes
        if self.task == "multilabel":
            return MetricCollection(
                {
                    "accuracy": MultilabelAccuracy(n),
                    "auroc": MultilabelDefinedAUROC(n),
                    "f1": MultilabelF1Score(n),
                    "precision": MultilabelPrecision(n),
                    "recall": MultilabelRecall(n),
                    "specificity": MultilabelSpecificity(n),
                }
            )
        metrics = {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "balanced_accuracy": MulticlassRecall(n, average="macro"),
            "auroc": MulticlassDefinedAUROC(n),
            "f1": MulticlassF1Score(n, average="macro"),
            "precision": MulticlassPrecision(n, average="macro"),
            "recall": MulticlassRecall(n, average="macro"),
            "specificity": MulticlassSpecificity(n, average="macro"),
        }
        if self.task == "binary":
            # clinicians read these for the positive class; binary AUROC equals the 2-class macro AUROC
            metrics["sensitivity"] = LambdaInputTransformer(BinaryRecall(), transform_pred=positive_class)
            metrics["specificity"] = LambdaInputTransformer(BinarySpecificity(), transform_pred=positive_class)
            metrics["precision"] = LambdaInputTransformer(BinaryPrecision(), transform_pred=positive_class)
            del metrics["recall"]
        return MetricCollection(metrics)

    def setup(self, stage: str) -> None:
        self._setup_sites(getattr(self._trainer, "datamodule", None))
        weights = self.hparams.class_weights
        if weights == "auto":
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "label_counts"):
                raise MedexpError("model.class_weights=auto needs a medexp DataModule that can count training labels")
            counts, total = datamodule.label_counts()
            counts = torch.as_tensor(counts, dtype=torch.float32)
            if (counts == 0).any():
                raise MedexpError(
                    f"model.class_weights=auto: classes {torch.nonzero(counts == 0).flatten().tolist()} have no "
                    "training samples; give explicit weights instead"
                )
            if self.task == "multilabel":
                weights = (total - counts) / counts
            else:
                weights = total / (self.num_classes * counts)
        if weights is not None:
            self.class_weight = torch.as_tensor(weights, dtype=torch.float32)

    def _setup_sites(self, datamodule: Any) -> None:
        names = getattr(datamodule, "site_names", None)
        if not names or self.site_names == list(names):
            return
        self.site_names = [str(name) for name in names]
        # keyed by index: ModuleDict keys cannot hold the dots a site name may have
        self.test_site_metrics = nn.ModuleDict(
            {
                str(i): self.configure_metrics().clone(prefix=f"test/site_{name}/")
                for i, name in enumerate(self.site_names)
            }
        ).to(self.device)
        self.test_site_counts = nn.ModuleDict({str(i): SumMetric() for i in range(len(self.site_names))}).to(
            self.device
        )

    def update_metrics(self, metrics: MetricCollection, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        super().update_metrics(metrics, outputs, batch)
        sites = batch.get("site")
        if metrics is not self.test_metrics or sites is None or self.test_site_metrics is None:
            return
        probs, target = self.postprocess(outputs), batch[self.target_key]
        for index in sites.unique().tolist():
            chosen = sites == index
            self.test_site_metrics[str(index)].update(probs[chosen], target[chosen])
            self.test_site_counts[str(index)].update(chosen.sum())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.test_site_metrics is None:
            return
        values = {}
        for index, name in enumerate(self.site_names):
            collection, count = self.test_site_metrics[str(index)], self.test_site_counts[str(index)]
            # the count is synced across DDP processes first, so all of them skip the same sites:
            # a site without test cases is left out of the log, not scored 0
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                n = count.compute()
            if n > 0:
                values.update({f"test/site_{name}/n": n, **collection.compute()})
                self._warn_undefined(collection, f"the test split of site {name}", f"test/site_{name}/auroc")
            collection.reset()
            count.reset()
        self.log_dict(values)

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        """The base's epoch log, plus a warning for classes whose AUROC is undefined in this
        split and, in the test stage, each class's AUROC (NaN where undefined)."""
        metrics = getattr(self, f"{stage}_metrics")
        values = super()._log_epoch(stage)
        auroc = self._warn_undefined(metrics, f"the {stage} split", f"{stage}/auroc")
        if stage == "test" and auroc is not None and auroc.per_class is not None:
            per_class = {f"test/class_{c}/auroc": value for c, value in enumerate(auroc.per_class)}
            self.log_dict(per_class)
            values.update(per_class)
        return values

    def _warn_undefined(self, metrics: MetricCollection, where: str, name: str) -> Any:
        """Warn (once per ``where`` and set of classes) about the classes whose AUROC the last
        compute() of ``metrics`` left out; returns its AUROC metric (None if it has none)."""
        auroc = next(
            (m for m in metrics.values() if isinstance(m, (MulticlassDefinedAUROC, MultilabelDefinedAUROC))), None
        )
        if auroc is None or not auroc.undefined or self.trainer.sanity_checking:
            return auroc
        key = (where, tuple(sorted(auroc.undefined)))
        if key not in self._undefined_warned:
            self._undefined_warned.add(key)
            classes = ", ".join(f"class {c} ({why})" for c, why in sorted(auroc.undefined.items()))
            defined = [str(c) for c in range(auroc.num_columns) if c not in auroc.undefined]
            rest = (
                f"{name} is the mean over the others ({', '.join(defined)})"
                if defined
                else f"{name} is undefined (NaN)"
            )
            log.warning("%s: AUROC is undefined for %s; %s", where, classes, rest)
        return auroc

    def prepare_batch(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        self.current_sites = batch.get("site")
        batch = super().prepare_batch(batch, stage)
        hp = self.hparams
        if stage != "train" or not (hp.mixup_alpha or hp.cutmix_alpha):
            return batch
        if hp.mix_prob < 1 and float(torch.rand(())) >= hp.mix_prob:
            return batch
        images, perm, lam = mix(batch[self.input_key], hp.mixup_alpha, hp.cutmix_alpha)
        return {**batch, self.input_key: images, "mix_index": perm, "mix_lambda": torch.tensor(lam)}

    def batch_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = batch[self.target_key]
        if "mix_index" not in batch:
            return self.compute_loss(outputs, target)
        lam = float(batch["mix_lambda"])
        return lam * self.compute_loss(outputs, target) + (1 - lam) * self.compute_loss(
            outputs, target[batch["mix_index"]]
        )

    def tta_axes(self, spatial_dims: int) -> list[int]:
        """The spatial axes test-time augmentation mirrors along (see ``tta_flips``)."""
        flips = self.hparams.get("tta_flips")
        if flips is True:
            return list(range(spatial_dims))
        return check_axes(flips or [], spatial_dims, "model.tta_flips")

    def infer(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """The logits of ``x``, averaged over the test-time views that ``tta_flips`` and
        ``tta_shift`` ask for (one pass without)."""
        flips, pixels = self.tta_axes(x.ndim - 2), self.hparams.get("tta_shift", 0)
        if not flips and not pixels:
            return self(x, **extra)
        return torch.stack([self(view, **extra) for view in tta_views(x, flips, pixels)]).mean(dim=0)

    def compute_loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = self.hparams.label_smoothing
        weight = None if self.class_weight is None else self.class_weight.to(outputs.device)
        if self.loss_kind == "focal":
            return focal_loss(outputs, target, self.task == "multilabel", self.hparams.focal_gamma, weight, smoothing)
        if self.task == "multilabel":
            target = target.float() * (1 - smoothing) + 0.5 * smoothing
            return F.binary_cross_entropy_with_logits(outputs, target, pos_weight=weight)
        if self.hparams.get("ordinal_smoothing"):
            return ordinal_cross_entropy(outputs, target, smoothing, weight)
        return F.cross_entropy(outputs, target, weight=weight, label_smoothing=smoothing)

    def postprocess(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, num_classes)`` logits -> probabilities (sigmoid for multi-label, softmax otherwise),
        of the logits divided by :attr:`temperature`."""
        outputs = outputs / self.temperature.to(outputs.dtype)
        return outputs.sigmoid() if self.task == "multilabel" else outputs.softmax(dim=1)
