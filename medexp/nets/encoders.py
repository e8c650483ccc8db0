"""Classifiers over the encoders of MONAI's reconstruction and segmentation nets, their modules
named as in those nets, so a trained autoencoder's or U-Net's weights start them by name
(``model.init_weights.path=<run>/checkpoints/best.ckpt``; see :mod:`medexp.checkpoints.weights`).

Each builds the MONAI net with the given arguments, keeps its encoder (the same modules under the
same names), and adds a head: global average pooling of the deepest features and a linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _head(spatial_dims: int, channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(pool(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))


class AutoEncoderClassifier(nn.Module):
    """The encoder of ``monai.networks.nets.AutoEncoder`` (``encode``, ``intermediate``) and a head.

    Args: as :class:`monai.networks.nets.AutoEncoder` (``channels``, ``strides``, ``kernel_size``,
        ``num_res_units``, ``inter_channels``, ``act``, ``norm``, ...) with ``num_classes`` outputs
        instead of ``out_channels``, and ``head_dropout`` before the linear layer.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int],
        strides: Sequence[int],
        head_dropout: float = 0.0,
        **autoencoder: Any,
    ) -> None:
        super().__init__()
        from monai.networks.nets import AutoEncoder

        net = AutoEncoder(spatial_dims, in_channels, in_channels, channels, strides, **autoencoder)
        self.encode, self.intermediate = net.encode, net.intermediate
        inter = autoencoder.get("inter_channels") or []
        self.head = _head(spatial_dims, inter[-1] if inter else channels[-1], num_classes, head_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.intermediate(self.encode(x)))


class UNetClassifier(nn.Module):
    """The down path of ``monai.networks.nets.UNet`` (its modules under ``model.``, as in the U-Net,
    the up path removed) and a head on the bottom layer's features.

    Args: as :class:`monai.networks.nets.UNet` (``channels``, ``strides``, ``num_res_units``,
        ``act``, ``norm``, ...) with ``num_classes`` outputs instead of ``out_channels``, and
        ``head_dropout`` before the linear layer.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int],
        strides: Sequence[int],
        head_dropout: float = 0.0,
        **unet: Any,
    ) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        self.model = UNet(spatial_dims, in_channels, 1, channels, strides, **unet).model
        # each level is Sequential(down, SkipConnection(next level), up); the last's is the bottom
        level = self.model
        while isinstance(level, nn.Sequential):
            del level[2]  # the up path
            level = level[1].submodule
        self.head = _head(spatial_dims, channels[-1], num_classes, head_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level: nn.Module = self.model
        while isinstance(level, nn.Sequential):
            x = level[0](x)
            level = level[1].submodule
        return self.head(level(x))
