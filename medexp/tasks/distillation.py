"""Knowledge distillation: a small classifier (the student) trained on a teacher's outputs.

The student is the task's ``net``; the teacher is a classifier trained by medexp, loaded from its
checkpoint (``model.teacher_ckpt``) when training starts. The loss of a training batch is

    (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(p_teacher^T || p_student^T)
        [+ feature_weight * MSE(projection(student features), teacher features)]

with ``p^T = softmax(logits / T)`` (Hinton et al., 2015; the ``T^2`` keeps the soft term's gradients
on the scale of the hard one's as T grows). Multi-label: per label, the Bernoulli KL between the
sigmoids of ``logits / T``, i.e. BCE against the teacher's soft targets minus their entropy, so the
term is 0 where the student matches the teacher. Feature matching (FitNets' hint, Romero et al.,
2015) compares the penultimate features (the input of each net's last linear layer) through a
learned linear projection from the student's width to the teacher's.

The teacher is a training device only: validation and test losses are the student's own
cross-entropy (comparable with a classifier trained without a teacher), and the student's
checkpoints hold no teacher weights, so ``medexp eval``, ``predict``, ``export`` and ``compress``
work without the teacher's file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from medexp.tasks.classification import ClassificationTask
from medexp.utils.errors import MedexpError

if TYPE_CHECKING:
    from medexp.checkpoints.checkpoint import Checkpoint

# data properties a teacher must share with the student's data (the teacher's outputs must mean
# the same classes, on images of the same kind)
MATCHED = ("task", "num_classes", "in_channels", "spatial_dims", "intensity_range")


def last_linear(net: nn.Module, role: str) -> nn.Linear:
    """The last :class:`torch.nn.Linear` of ``net``: its input are the penultimate features.

    Raises:
        MedexpError: when ``net`` has none (``role``, e.g. ``student``, names the net).
    """
    heads = [module for module in net.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise MedexpError(
            f"model.feature_weight > 0 needs the penultimate features of the {role} ({type(net).__name__}): the input "
            "of its last linear layer, and it has none; set model.feature_weight=0"
        )
    return heads[-1]


def load_teacher_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint ``model.teacher_ckpt`` names, loaded safely (see
    :class:`~medexp.checkpoints.checkpoint.Checkpoint`).

    Raises:
        MedexpError: naming ``model.teacher_ckpt`` when it is unset, missing or not loadable.
    """
    from medexp.checkpoints.checkpoint import Checkpoint

    if path is None:
        raise MedexpError(
            "model.teacher_ckpt=null; distillation needs a classifier checkpoint trained by medexp on the same data, "
            "e.g. model.teacher_ckpt=<teacher run>/checkpoints/best.ckpt"
        )
    if not Path(path).expanduser().is_file():
        raise MedexpError(f"model.teacher_ckpt={str(path)!r}: no such file")
    return Checkpoint(path, name="model.teacher_ckpt")


def teacher_problems(checkpoint: Checkpoint, data: Mapping[str, Any], path: str | Path) -> list[str]:
    """Why the teacher in ``checkpoint`` cannot teach on ``data`` (a data config, or a data
    module's properties), one message per problem; empty when it can.

    Compared: that the teacher is a classifier, and the data properties :data:`MATCHED`.
    """
    target = checkpoint.model_target
    found = checkpoint.task_class  # None when not importable: rebuilding it would fail the same way
    is_classifier = found is not None and issubclass(found, ClassificationTask)
    if not is_classifier:
        return [
            f"model.teacher_ckpt={str(path)!r}: a {target.rsplit('.', 1)[-1] or 'non-medexp'} checkpoint; the teacher "
            "must be a classifier trained by medexp (e.g. model=resnet18)"
        ]
    problems = []
    trained = checkpoint.get("data", {})
    for key in MATCHED:
        if key not in trained or data.get(key) is None:
            continue
        theirs, ours = trained[key], data[key]
        if key == "intensity_range":
            theirs, ours = [float(v) for v in theirs], [float(v) for v in ours]
        if theirs != ours:
            problems.append(
                f"model.teacher_ckpt={str(path)!r}: the teacher was trained on data.{key}={theirs!r}, but these data "
                f"have data.{key}={ours!r}; distil on the data the teacher learnt (or train a teacher on these)"
            )
    return problems


class DistillationTask(ClassificationTask):
    """A classifier (``net``, the student) trained to match a teacher classifier's softened
    outputs as well as the labels; see the module's docstring for the loss.

    Logged besides the classifier's metrics, per training epoch: ``train/ce_loss`` (labels),
    ``train/kd_loss`` (the KL term, times ``T^2``), ``train/teacher_agreement`` (the fraction of
    predictions, per label for multi-label tasks, equal to the teacher's) and, with feature
    matching, ``train/feature_loss``; ``train/loss`` is their weighted sum.

    Args:
        net: the student, ``(B, C, *spatial)`` -> ``(B, num_classes)`` logits.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        num_classes: classes (2 for binary) or labels (multi-label).
        teacher_ckpt: a medexp classifier checkpoint trained on the same data (classes, channels,
            dimensions and intensity range); loaded when training starts, so rebuilding a
            student for evaluation needs no teacher (None: the student alone, no training).
        alpha: weight of the distillation term, in [0, 1]; 1 learns from the teacher alone.
        kd_temperature: the softmax temperature T (> 0) of both nets' logits in the KL term.
        feature_weight: weight of the feature-matching term; 0 switches it off.
        **kwargs: ``class_weights``, ``label_smoothing`` (of the cross-entropy term),
            ``calibrate``, ``optimizer``, ``scheduler``, ``monitor``; see
            :class:`~medexp.tasks.classification.ClassificationTask`.
    """

    def __init__(
        self,
        net: nn.Module,
        task: str,
        num_classes: int,
        teacher_ckpt: str | None = None,
        alpha: float = 0.5,
        kd_temperature: float = 4.0,
        feature_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise MedexpError(
                f"model.alpha={alpha!r}; expected a number in [0, 1] (the weight of the distillation term)"
            )
        if isinstance(kd_temperature, bool) or not isinstance(kd_temperature, (int, float)) or not kd_temperature > 0:
            raise MedexpError(f"model.kd_temperature={kd_temperature!r}; expected a number > 0")
        if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or not feature_weight >= 0:
            raise MedexpError(
                f"model.feature_weight={feature_weight!r}; expected a number >= 0 (0: no feature matching)"
            )
        super().__init__(net, task=task, num_classes=num_classes, **kwargs)
        parts = ["ce_loss", "kd_loss", "teacher_agreement", *(["feature_loss"] if feature_weight > 0 else [])]
        self.distill_metrics = MetricCollection({name: MeanMetric() for name in parts}, prefix="train/")
        # student features -> teacher features; built once the teacher's width is known (setup),
        # or from the weights of a checkpoint being loaded (see _load_from_state_dict)
        self.register_module("projection", None)
        # a tuple: the teacher is no submodule, so it is neither trained nor saved with the student
        self._teacher: tuple[ClassificationTask, nn.Linear | None] | None = None
        self._student_hook: Any = None
        self._student_features: torch.Tensor | None = None

    @classmethod
    def config_problems(cls, config: dict[str, Any]) -> list[str]:
        """The teacher checked against the data of a resolved run config before anything is
        built (called by :func:`medexp.utils.validation.check_combinations`)."""
        path = (config.get("model") or {}).get("teacher_ckpt")
        try:
            checkpoint = load_teacher_checkpoint(path)
        except MedexpError as exc:
            return [str(exc)]
        return teacher_problems(checkpoint, config.get("data") or {}, path)

    @property
    def teacher(self) -> ClassificationTask | None:
        """The teacher, once training has loaded it (None before, and in evaluation)."""
        return None if self._teacher is None else self._teacher[0]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self._teacher is None:
            self.load_teacher(getattr(self.trainer, "datamodule", None))

    def load_teacher(self, datamodule: Any = None) -> ClassificationTask:
        """Load the teacher from ``teacher_ckpt``, checked against the student (task, classes)
        and, when given, ``datamodule``'s properties; build the feature projection.

        Raises:
            MedexpError: naming ``model.teacher_ckpt`` and every mismatch.
        """
        from medexp.checkpoints.checkpoint import INFERENCE

        path = self.hparams.teacher_ckpt
        checkpoint = load_teacher_checkpoint(path)
        ours = {"task": self.task, "num_classes": self.num_classes}
        ours.update({key: getattr(datamodule, key) for key in MATCHED if hasattr(datamodule, key)})
        problems = teacher_problems(checkpoint, ours, path)
        if problems:
            raise MedexpError("; ".join(problems))
        teacher = checkpoint.build_model(INFERENCE).requires_grad_(False)
        head = None
        if self.hparams.feature_weight > 0:
            head = last_linear(teacher.net, "teacher")
            student_head = last_linear(self.net, "student")
            shape = (head.in_features, student_head.in_features)
            if self.projection is None or tuple(self.projection.weight.shape) != shape:
                self.projection = nn.Linear(shape[1], shape[0]).to(self.device)
            self._student_hook = student_head.register_forward_hook(self._keep_student_features)
        self._teacher = (teacher, head)
        return teacher

    def _keep_student_features(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._student_features = inputs[0]

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._student_hook is not None:
            self._student_hook.remove()
            self._student_hook, self._student_features = None, None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint of a student trained with feature matching holds the projection's weights;
        # build it to their shape (children load after this), with or without the teacher
        weight = state_dict.get(f"{prefix}projection.weight")
        if weight is not None and (self.projection is None or self.projection.weight.shape != weight.shape):
            self.projection = nn.Linear(weight.shape[1], weight.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def prepare_batch(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Training batches gain the teacher's logits ``teacher_logits`` ``(B, num_classes)``
        and, with feature matching, its penultimate features ``teacher_features`` ``(B, F)``."""
        if stage != "train" or self._teacher is None:
            return batch
        teacher, head = self._teacher
        inputs = batch[self.input_key]
        if next(teacher.parameters()).device != inputs.device:
            teacher.to(inputs.device)
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0])) if head else None
        try:
            with torch.no_grad():
                logits = teacher.infer(inputs, **teacher.net_extras(batch))
        finally:
            if hook is not None:
                hook.remove()
        extra = {"teacher_features": captured[0].flatten(1)} if captured else {}
        return {**batch, "teacher_logits": logits, **extra}

    def batch_loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "teacher_logits" not in batch:  # validation and test: the student's own cross-entropy
            return super().batch_loss(outputs, batch)
        teacher_logits = batch["teacher_logits"]
        ce, kd = self.distillation_terms(outputs, teacher_logits, batch[self.target_key])
        alpha = self.hparams.alpha
        loss = (1 - alpha) * ce + alpha * kd
        count = outputs.shape[0]
        parts = {"ce_loss": ce, "kd_loss": kd, "teacher_agreement": self.agreement(outputs, teacher_logits)}
        if self.hparams.feature_weight > 0:
            student = self._student_features.flatten(1)
            feature = F.mse_loss(self.projection(student), batch["teacher_features"].to(student.dtype))
            loss = loss + self.hparams.feature_weight * feature
            parts["feature_loss"] = feature
        if not self.sharpness_pass:  # SAM's second pass is not counted (medexp.tasks.sharpness)
            for name, value in parts.items():
                self.distill_metrics[name].update(value.detach(), weight=count)
        return loss

    def distillation_terms(
        self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The label term (the classifier's loss) and the distillation term, ``T^2`` included.

        Args:
            student, teacher: ``(B, num_classes)`` logits.
            target: ``(B,)`` class indices, or ``(B, num_classes)`` 0/1 labels for multi-label.
        """
        ce = self.compute_loss(student, target)
        t = float(self.hparams.kd_temperature)
        teacher = teacher.to(student.dtype)
        if self.task == "multilabel":
            soft = torch.sigmoid(teacher / t)
            # BCE against soft targets minus their entropy: the Bernoulli KL, 0 at a perfect match
            kd = F.binary_cross_entropy_with_logits(student / t, soft) - F.binary_cross_entropy_with_logits(
                teacher / t, soft
            )
        else:
            kd = F.kl_div(
                F.log_softmax(student / t, dim=1),
                F.log_softmax(teacher / t, dim=1),
                reduction="batchmean",
                log_target=True,
            )
        return ce, kd * t * t

    def agreement(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The fraction of the student's decisions (argmax; multi-label: each logit > 0) that
        equal the teacher's, for ``(B, num_classes)`` logits."""
        if self.task == "multilabel":
            return ((student > 0) == (teacher > 0)).float().mean()
        return (student.argmax(dim=1) == teacher.argmax(dim=1)).float().mean()

    def logged_metrics(self) -> list[str]:
        return sorted({*super().logged_metrics(), *self.distill_metrics.keys()})

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._teacher is not None:
            self.log_dict(self.distill_metrics.compute())
            self.distill_metrics.reset()
