"""Sample quality without Inception weights: FID and KID on a medexp classifier's features.

The usual FID runs images through an ImageNet Inception network whose weights are downloaded;
on machines without internet, and for grey 28-pixel medical images that look nothing like
ImageNet, features of a classifier trained on the same kind of images are both available and
more telling. "Domain FID/KID" here are torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` with such a classifier (a medexp checkpoint) as the feature
extractor: the penultimate activations, the input of the network's last linear layer. Values
are comparable only between runs that use the same classifier checkpoint, and FID is biased
upwards with few samples (it needs more images than features to be stable); KID is unbiased,
so prefer it on small validation sets.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from medexp.utils.errors import MedexpError


class DomainFeatures(nn.Module):
    """``(B, C, *spatial)`` images -> ``(B, num_features)`` penultimate features of a classifier.

    The classifier is held outside the module tree, so a model that measures its samples with
    it (a GAN's metrics) does not store the classifier's weights in its own checkpoints; it is
    moved to the images' device on use and always runs in evaluation mode without gradients.

    Args:
        net: a classifier whose last :class:`torch.nn.Linear` layer produces its outputs.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        heads = [module for module in net.modules() if isinstance(module, nn.Linear)]
        if not heads:
            raise MedexpError(f"{type(net).__name__} has no linear layer whose input could serve as features")
        self.num_features = heads[-1].in_features
        # a tuple: neither is a registered submodule (no weights in the state dict)
        self._parts = (net.eval().requires_grad_(False), heads[-1])

    @classmethod
    def from_checkpoint(cls, path: str | Path, low: float | None = None, high: float | None = None) -> DomainFeatures:
        """The features of the classification model in a medexp checkpoint.

        Args:
            low, high: the intensity range of the images to measure; refused when the
                classifier was trained on data in another range.

        Raises:
            MedexpError: when the checkpoint cannot be loaded safely, names untrusted targets, is
                not a classifier's, or was trained on another intensity range.
        """
        from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint

        checkpoint = Checkpoint(path, name="feature_ckpt")
        if not getattr(checkpoint.task_class, "measures_features", False):
            name = checkpoint.model_target.rsplit(".", 1)[-1] or "non-medexp"
            raise MedexpError(f"feature_ckpt={str(path)!r}: a {name} checkpoint; expected a classifier's")
        model = checkpoint.build_model(INFERENCE)
        trained = checkpoint.get("data.intensity_range")
        if low is not None and trained is not None and [float(v) for v in trained] != [low, high]:
            raise MedexpError(
                f"feature_ckpt={str(path)!r}: the classifier saw images in {list(trained)}, but these are in "
                f"{[low, high]}; train the classifier on the same data (and transforms)"
            )
        return cls(model.net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net, head = self._parts
        if next(net.parameters()).device != images.device:
            net.to(images.device)
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            with torch.no_grad():
                net(images.float())
        finally:
            hook.remove()
        return captured[0].flatten(1)


def quality_metrics(features: DomainFeatures, kid_subset_size: int = 50) -> dict[str, nn.Module]:
    """``domain_fid`` and ``domain_kid`` on ``features`` (update each with ``real=True`` images
    and ``real=False`` samples). KID draws ``kid_subset_size`` images per subset: at most the
    number of images of either kind."""
    # from their modules: torchmetrics.image exports them only where torch-fidelity (the
    # Inception weights' package) is installed, which these metrics do not use
    from torchmetrics.image.fid import FrechetInceptionDistance

    with warnings.catch_warnings():
        # KID keeps every feature vector: a few hundred floats per image here, not Inception's 2048
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        return {
            "domain_fid": FrechetInceptionDistance(feature=features),
            "domain_kid": MeanKID(feature=features, subset_size=kid_subset_size),
        }


def check_kid_subsets(trainer: object, stage: str, kid_subset_size: int) -> None:
    """Refuse, before training, a ``model.kid_subset_size`` larger than the validation or test
    split of the trainer's data module (KID draws subsets of that many real images).

    Raises:
        MedexpError: naming the splits, their sizes and the largest valid ``kid_subset_size``.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "datasets"):
        return
    datamodule.setup(stage)
    sizes = {split: len(datamodule.datasets[split]) for split in ("val", "test") if split in datamodule.datasets}
    small = {split: size for split, size in sizes.items() if size < kid_subset_size}
    if small:
        raise MedexpError(
            f"model.kid_subset_size={kid_subset_size} but the split(s) {small} hold fewer images; "
            f"set model.kid_subset_size to at most {min(small.values())}"
        )


class MeanKID(KernelInceptionDistance):
    """torchmetrics' ``KernelInceptionDistance`` whose ``compute`` gives the mean over subsets
    alone (a value loggers and checkpoint monitors take); :meth:`compute_with_std` gives both."""

    def compute(self) -> torch.Tensor:
        return super().compute()[0]

    def compute_with_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation over subsets (one process: no sync across DDP ranks)."""
        return super().compute()
