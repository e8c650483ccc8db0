"""A small convolutional classifier, fast enough for CPU experiments."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3(x3) convolution, batch norm, ReLU: ``(B, in, *spatial)`` -> ``(B, out, *spatial / stride)``.

    Built from torch layers with the child names of MONAI's ``Convolution(..., norm="batch",
    act="relu")`` (``conv``, ``adn.N``, ``adn.A``), so checkpoints of either load into the other,
    without importing MONAI (about 2 s) on the default command's path.
    """
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    adn = nn.Sequential()
    adn.add_module("N", norm(out_channels))
    adn.add_module("A", nn.ReLU())
    block = nn.Sequential()
    block.add_module("conv", conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1))
    block.add_module("adn", adn)
    return block


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
                layers.append(conv_block(spatial_dims, previous, width, stride))
                previous = width
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial_dims]
        self.features = nn.Sequential(*layers, pool(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
