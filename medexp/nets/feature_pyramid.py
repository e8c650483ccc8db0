"""A feature pyramid over a MONAI ResNet's stages, the ``feature_extractor`` of MONAI's RetinaNet
(``model=retinanet``), built without torchvision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medexp.utils.errors import MedexpError


class ResNetFeaturePyramid(nn.Module):
    """Feature maps of a MONAI ResNet's stages merged top-down by MONAI's
    ``FeaturePyramidNetwork``: the ``feature_extractor`` a RetinaNet takes.

    MONAI's ``resnet_fpn_feature_extractor`` builds the same through torchvision's
    ``IntermediateLayerGetter``; this needs no torchvision. Only the ResNet's stem and the
    stages up to the deepest returned one are kept (no unused parameters, e.g. under DDP).

    Input ``(B, C, *spatial)``; output ``{"0": (B, out_channels, *spatial / strides[0]), ...}``,
    one map per returned stage, highest resolution first.

    Args:
        backbone: a ``monai.networks.nets.ResNet`` (any block, widths, stem stride).
        returned_layers: the stages (1-4, increasing) whose outputs become pyramid levels.
        out_channels: channels of every level (RetinaNet's heads normalise in groups of 8, so a
            multiple of 8).

    Attributes:
        strides: per level, input pixels per feature-map pixel along each axis.
        size_divisible: the coarsest level's strides: input sizes must be multiples of them.
    """

    def __init__(self, backbone: nn.Module, returned_layers: Sequence[int] = (2, 3), out_channels: int = 32) -> None:
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork

        super().__init__()
        layers = list(returned_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] > 4:
            raise MedexpError(
                f"model.net.feature_extractor.returned_layers={layers}; expected increasing stages in 1..4"
            )
        if out_channels < 8 or out_channels % 8:
            raise MedexpError(
                f"model.net.feature_extractor.out_channels={out_channels}; expected a multiple of 8 (RetinaNet's "
                "heads use GroupNorm with 8 groups)"
            )
        if not all(hasattr(backbone, name) for name in ("conv1", "bn1", "act", "layer1")):
            raise MedexpError(
                f"model.net.feature_extractor.backbone is a {type(backbone).__name__}; expected a "
                "monai.networks.nets.ResNet"
            )
        spatial_dims = backbone.conv1.weight.ndim - 2
        pool = not getattr(backbone, "no_max_pool", False)
        stem = [backbone.conv1, backbone.bn1, backbone.act, *([backbone.maxpool] if pool else [])]
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList(getattr(backbone, f"layer{k}") for k in range(1, layers[-1] + 1))
        self.returned = [k - 1 for k in layers]
        stem_stride = [s * (2 if pool else 1) for s in _per_axis(backbone.conv1.stride, spatial_dims)]
        # ResNet stages 2-4 halve the resolution; stage 1 keeps it
        self.strides = [tuple(s * 2 ** (k - 1) for s in stem_stride) for k in layers]
        self.size_divisible = self.strides[-1]
        widths = [_out_channels(self.stages[k]) for k in self.returned]
        self.fpn = FeaturePyramidNetwork(spatial_dims=spatial_dims, in_channels_list=widths, out_channels=out_channels)
        self.out_channels = out_channels

    @property
    def num_levels(self) -> int:
        return len(self.returned)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        features = {}
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.returned:
                features[str(len(features))] = x
        return self.fpn(features)


def _per_axis(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _out_channels(stage: nn.Module) -> int:
    # a ResNet stage ends with its widest convolution (the block's last, or its shortcut's)
    return [m for m in stage.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1].out_channels
