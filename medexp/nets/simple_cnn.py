"""A small convolutional classifier, fast enough for CPU experiments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn


class SimpleCNN(nn.Module):
    """Stages of two conv-norm-ReLU blocks (the second halves the resolution), global average
    pooling, dropout and a linear head. Works on any input size at least ``2 ** len(channels)``.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: input channels.
        out_channels: number of outputs (logits).
        channels: feature channels of each stage.
        dropout: dropout probability before the head.

    Shapes:
        ``(B, in_channels, *spatial)`` -> ``(B, out_channels)``
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims should be 1, 2 or 3, got {spatial_dims}.")
        if len(channels) < 1:
            raise ValueError("the length of `channels` should be no less than 1.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout should be in [0, 1), got {dropout}.")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            for stride in (1, 2):
                layers.append(
                    Convolution(spatial_dims, previous, width, strides=stride, kernel_size=3, norm="batch", act="relu")
                )
                previous = width
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial_dims]
        self.features = nn.Sequential(*layers, pool(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
