"""CNNLSTM: padding masked everywhere, time features, volumes as slice sequences, validation."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import resnet18
from torch import nn
from torch.nn.utils.rnn import pad_packed_sequence

from medexp.nets.cnn_lstm import CNNLSTM
from medexp.nets.simple_cnn import SimpleCNN

LENGTHS = [1, 3, 7]
T = 7


def make_net(encoder: nn.Module | None = None, **kwargs) -> CNNLSTM:
    torch.manual_seed(0)
    if encoder is None:
        # BatchNorm inside, so a leak of padded frames into its statistics would show
        encoder = SimpleCNN(spatial_dims=2, in_channels=1, out_channels=8, channels=(4,))
    return CNNLSTM(encoder=encoder, **{"feature_size": 8, "out_channels": 3, "hidden_size": 8, **kwargs})


def padded_batch(lengths=LENGTHS, steps=T, size=8) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(len(lengths), steps, 1, size, size)
    return x, torch.tensor(lengths)


def warm_up(net: CNNLSTM) -> CNNLSTM:
    """One train-mode pass so BatchNorm's running statistics are not the trivial initial ones."""
    net.train()
    time = torch.arange(4.0).expand(2, 4) * 100 if net.time_features else None
    with torch.no_grad():
        net(torch.randn(2, 4, 1, 8, 8) * 3 + 1, time=time)
    return net.eval()


@pytest.mark.parametrize("pooling", ["last", "mean", "attention"])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_is_masked(pooling, rnn, bidirectional):
    net = warm_up(make_net(pooling=pooling, rnn=rnn, bidirectional=bidirectional))
    x, length = padded_batch()
    with torch.no_grad():
        out = net(x, length=length)
        assert out.shape == (3, 3)
        for i, n in enumerate(LENGTHS):
            alone = net(x[i : i + 1, :n])
            torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=0)

        # whatever the padded frames hold, the output is unchanged
        noisy = x.clone()
        for i, n in enumerate(LENGTHS):
            noisy[i, n:] = torch.randn_like(noisy[i, n:]) * 1000
        assert torch.equal(net(noisy, length=length), out)

        # control: unmasked, the same padding changes the length-1 sequence's output
        unmasked = net(x, length=None)
        assert not torch.allclose(unmasked[0], out[0], atol=1e-3)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_last_pooling_is_final_state(rnn, bidirectional):
    """``last`` pools the forward direction at each sequence's last valid step and the backward
    direction at step 0: exactly the final hidden states the RNN reports for a packed batch."""
    net = make_net(rnn=rnn, bidirectional=bidirectional, num_layers=2).eval()
    seen = {}
    net.rnn.register_forward_hook(lambda _, __, out: seen.update(final=out[1][0] if rnn == "lstm" else out[1]))
    net.head.register_forward_pre_hook(lambda _, args: seen.update(pooled=args[0]))
    x, length = padded_batch()
    with torch.no_grad():
        net(x, length=length)
    final = seen["final"]
    expected = torch.cat([final[-2], final[-1]], dim=-1) if bidirectional else final[-1]
    torch.testing.assert_close(seen["pooled"], expected, atol=1e-6, rtol=0)


def test_time_features():
    net = warm_up(make_net(time_features=True))
    x, length = padded_batch()
    days = torch.arange(T, dtype=torch.float).expand(3, T) * 180
    with torch.no_grad():
        out = net(x, length=length, time=days)
        # different gaps, different output (the length-1 sequence has no gap to change)
        stretched = net(x, length=length, time=days * 2)
        assert not torch.allclose(out[1:], stretched[1:], atol=1e-4)
        torch.testing.assert_close(out[0], stretched[0])
        # only differences of times count, and time_scale converts the units
        torch.testing.assert_close(net(x, length=length, time=days + 1000), out, atol=1e-5, rtol=0)
        net.time_scale = 1.0
        torch.testing.assert_close(net(x, length=length, time=days / 365), out, atol=1e-5, rtol=0)
        net.time_scale = 365.0
        # padded times, even NaN, change nothing
        padded = days.clone()
        padded[~(torch.arange(T) < length[:, None])] = float("nan")
        assert torch.equal(net(x, length=length, time=padded), out)
    with pytest.raises(ValueError, match="time"):
        net(x, length=length)
    with pytest.raises(ValueError, match="time"):
        net(x, length=length, time=days[:, :3])


def test_time_feature_values():
    """The RNN's last two inputs are the gap since the previous step and time since the first."""
    net = make_net(time_features=True, time_scale=2.0).eval()
    seen = {}
    net.rnn.register_forward_pre_hook(lambda _, args: seen.update(inputs=pad_packed_sequence(args[0], True)[0]))
    time = torch.tensor([[10.0, 12.0, 18.0], [4.0, 8.0, 99.0]])
    net(torch.randn(2, 3, 1, 8, 8), length=torch.tensor([3, 2]), time=time)
    expected = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]])
    torch.testing.assert_close(seen["inputs"][..., -2:], expected)


@pytest.mark.parametrize("axis", [2, 3, 4])
def test_volume_as_slice_sequence(axis):
    sequence_net = warm_up(make_net())
    volume_net = make_net(sequence_axis=axis)
    volume_net.load_state_dict(sequence_net.state_dict())
    volume_net.eval()
    torch.manual_seed(2)
    volume = torch.randn(2, 1, 5, 6, 7)
    slices = volume.movedim(axis, 1)  # e.g. axis 2: (B, C, D, H, W) -> (B, D, C, H, W)
    with torch.no_grad():
        out = volume_net(volume)
        torch.testing.assert_close(out, sequence_net(slices), atol=1e-6, rtol=0)
        # a different axis reads different slices
        other = 3 if axis == 2 else 2
        volume_net.sequence_axis = other
        assert not torch.allclose(volume_net(volume), out, atol=1e-4)
    with pytest.raises(ValueError, match="sequence_axis"):
        volume_net(torch.randn(2, 1, 6, 7))


def test_train_gradients_and_batchnorm_see_only_valid_frames():
    net = make_net(pooling="attention", bidirectional=True).train()
    x, length = padded_batch()
    x[0, 1:] = 1e3  # outrageous padding would shift BatchNorm's running mean if it leaked in
    reference = copy.deepcopy(net.encoder)
    batch_sizes = []
    net.encoder.register_forward_pre_hook(lambda _, args: batch_sizes.append(args[0].shape[0]))
    net(x, length=length).sum().backward()
    assert batch_sizes == [sum(LENGTHS)]
    for name, parameter in net.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # BatchNorm statistics are exactly those of the valid frames alone
    mask = torch.arange(T) < length[:, None]
    reference(x[mask])
    for (name, mine), theirs in zip(net.encoder.named_buffers(), reference.buffers()):
        torch.testing.assert_close(mine, theirs, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rnn": "transformer"}, "rnn"),
        ({"pooling": "max"}, "pooling"),
        ({"sequence_axis": 1}, "sequence_axis"),
        ({"sequence_axis": 5}, "sequence_axis"),
        ({"dropout": 1.0}, "dropout"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"time_scale": 0.0}, "time_scale"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_net(**kwargs)


def test_input_validation():
    net = make_net().eval()
    x, _ = padded_batch()
    for bad in (torch.tensor([0, 3, 7]), torch.tensor([1, 3, 8]), torch.tensor([1, 3]), torch.tensor([1.0, 3.0, 7.0])):
        with pytest.raises(ValueError, match="length"):
            net(x, length=bad)
    with pytest.raises(ValueError, match="x should be"):
        net(x[:, 0])
    wrong_width = CNNLSTM(encoder=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), feature_size=8, out_channels=2)
    with pytest.raises(ValueError, match="feature_size"):
        wrong_width(x)
    assert CNNLSTM.extra_inputs == ("length", "time")


@pytest.mark.parametrize(
    "encoder",
    [
        lambda: SimpleCNN(spatial_dims=2, in_channels=1, out_channels=8),
        lambda: resnet18(spatial_dims=2, n_input_channels=1, num_classes=8),
    ],
    ids=["simple_cnn", "resnet18"],
)
def test_encoders(encoder):
    torch.manual_seed(0)
    net = make_net(encoder(), pooling="mean", dropout=0.1, num_layers=2)
    x, length = padded_batch(size=16)
    net.train()
    out = net(x, length=length)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    out.sum().backward()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, length=length)[1:2], net(x[1:2, :3]), atol=1e-5, rtol=0)
