"""A 2D CNN applied frame by frame, a recurrent layer over the frames, and a classification head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class CNNLSTM(nn.Module):
    """Encodes each 2D frame with ``encoder``, runs an LSTM or GRU over the frame features and
    classifies the pooled sequence. For (a) a patient's images over time (longitudinal) and
    (b) the slices of a volume read as a sequence ("2.5D", with ``sequence_axis``).

    Padded steps (index ``>= length``) cannot influence the output: the encoder sees only valid
    frames (so padding never enters BatchNorm statistics), the RNN runs on a packed sequence and
    mean/attention pooling are masked.

    Args:
        encoder: a 2D network mapping ``(N, C, H, W)`` to ``(N, feature_size)``.
        feature_size: the encoder's output width.
        out_channels: number of outputs (logits).
        hidden_size: hidden units of the RNN (per direction).
        num_layers: stacked RNN layers.
        bidirectional: run the RNN in both directions.
        rnn: ``"lstm"`` or ``"gru"``.
        dropout: dropout probability before the head, and between RNN layers when ``num_layers > 1``.
        pooling: how the sequence becomes one vector: ``"last"`` (state at each sequence's last
            valid step; bidirectional: forward direction's last valid step and backward direction's
            step 0), ``"mean"`` (mean over valid steps) or ``"attention"`` (additive attention).
        time_features: append to each step's features the gap since the previous step and the
            time since the first step (the first step's gap is 0), both divided by ``time_scale``.
        time_scale: divisor of the times, e.g. 365 to turn days into years.
        sequence_axis: None for sequences ``(B, T, C, H, W)``; 2, 3 or 4 for volumes
            ``(B, C, D, H, W)`` whose spatial axis ``sequence_axis`` is unrolled into 2D slices.

    Shapes:
        ``x``: ``(B, T, C, H, W)``, or ``(B, C, *spatial)`` with 3 spatial axes when
        ``sequence_axis`` is set; ``length``: ``(B,)``; ``time``: ``(B, T)``
        -> ``(B, out_channels)``
    """

    # the batch keys a task passes to forward as keyword arguments when the batch has them
    extra_inputs = ("length", "time")

    def __init__(
        self,
        encoder: nn.Module,
        feature_size: int,
        out_channels: int,
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        rnn: str = "lstm",
        dropout: float = 0.0,
        pooling: str = "last",
        time_features: bool = False,
        time_scale: float = 365.0,
        sequence_axis: int | None = None,
    ) -> None:
        super().__init__()
        sizes = {
            "feature_size": feature_size,
            "out_channels": out_channels,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} should be a positive integer, got {value}.")
        if rnn not in ("lstm", "gru"):
            raise ValueError(f"rnn should be 'lstm' or 'gru', got {rnn!r}.")
        if pooling not in ("last", "mean", "attention"):
            raise ValueError(f"pooling should be 'last', 'mean' or 'attention', got {pooling!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout should be in [0, 1), got {dropout}.")
        if time_scale <= 0:
            raise ValueError(f"time_scale should be positive, got {time_scale}.")
        if sequence_axis not in (None, 2, 3, 4):
            raise ValueError(f"sequence_axis should be None, 2, 3 or 4, got {sequence_axis}.")
        self.encoder = encoder
        self.feature_size = feature_size
        self.hidden_size = hidden_size
        self.bidirectional = bidirectional
        self.pooling = pooling
        self.time_features = time_features
        self.time_scale = time_scale
        self.sequence_axis = sequence_axis
        # PyTorch warns about (and ignores) inter-layer dropout on a single layer
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn](
            feature_size + (2 if time_features else 0),
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        width = hidden_size * (2 if bidirectional else 1)
        self.attention = (
            nn.Sequential(nn.Linear(width, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1, bias=False))
            if pooling == "attention"
            else None
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, out_channels))

    def forward(
        self, x: torch.Tensor, length: torch.Tensor | None = None, time: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.sequence_axis is not None:
            if x.ndim != 5:
                raise ValueError(f"with sequence_axis set, x should be (B, C, D, H, W), got shape {tuple(x.shape)}.")
            x = x.movedim(self.sequence_axis, 1)
        if x.ndim != 5:
            raise ValueError(f"x should be (B, T, C, H, W), got shape {tuple(x.shape)}.")
        batch, steps = x.shape[:2]
        if length is None:
            length = torch.full((batch,), steps, dtype=torch.long)
        if length.shape != (batch,) or length.is_floating_point():
            raise ValueError(
                f"length should be an integer tensor of shape ({batch},), got {length.dtype} {tuple(length.shape)}."
            )
        # pack_padded_sequence wants lengths on the CPU; checking them here costs no extra sync
        length = length.cpu()
        if (length < 1).any() or (length > steps).any():
            raise ValueError(f"length should be in [1, {steps}], got {length.tolist()}.")
        mask = torch.arange(steps) < length[:, None]
        # only valid frames reach the encoder, so padding never enters BatchNorm statistics
        encoded = self.encoder(x[mask.to(x.device)])
        if encoded.shape != (int(length.sum()), self.feature_size):
            raise ValueError(
                f"encoder should output (N, feature_size={self.feature_size}), got {tuple(encoded.shape)}."
            )
        mask = mask.to(encoded.device)
        features = encoded.new_zeros(batch, steps, self.feature_size)
        features[mask] = encoded
        if self.time_features:
            features = torch.cat([features, self._time_features(time, mask, features.dtype)], dim=-1)
        packed = pack_padded_sequence(features, length, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=steps)
        return self.head(self._pool(out, mask, length.to(out.device)))

    def _time_features(self, time: torch.Tensor | None, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if time is None:
            raise ValueError("time_features=True needs `time` (B, T), the time of each step.")
        if time.shape != mask.shape:
            raise ValueError(f"time should have shape {tuple(mask.shape)} (B, T), got {tuple(time.shape)}.")
        time = time.to(device=mask.device, dtype=dtype) / self.time_scale
        gap = torch.cat([torch.zeros_like(time[:, :1]), time.diff(dim=1)], dim=1)
        since_first = time - time[:, :1]
        # padded times may be anything (NaN included): zero them rather than trust the packing alone
        return torch.where(mask[..., None], torch.stack([gap, since_first], dim=-1), 0.0)

    def _pool(self, out: torch.Tensor, mask: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            last = out[torch.arange(out.shape[0], device=out.device), length - 1]
            if not self.bidirectional:
                return last
            # the backward direction ends at step 0, where it has read the whole valid sequence
            return torch.cat([last[:, : self.hidden_size], out[:, 0, self.hidden_size :]], dim=-1)
        if self.pooling == "mean":
            return (out * mask[..., None]).sum(dim=1) / length[:, None].to(out.dtype)
        scores = self.attention(out).squeeze(-1).masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=1)[..., None] * out).sum(dim=1)
