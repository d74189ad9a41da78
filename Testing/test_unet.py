"""Residual U-Net: shapes at odd sizes, embedding/classifier consistency, config round trip,
gradients, a toy overfit, input immutability, norm variants and argument validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SFUDASegmentLib.config import SegNetConfig
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.nets import ResidualUNet
from SFUDASegmentLib.nets.unet import make_norm


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _net2d(**kwargs) -> ResidualUNet:
    args = dict(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), res_units=1)
    args.update(kwargs)
    return ResidualUNet(**args)


def test_2d_odd_size_shapes_and_embedding():
    net = ResidualUNet(2, in_channels=3, out_channels=4, channels=(8, 16, 32, 64)).eval()
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        logits = net(x)
        logits2, z = net(x, return_embedding=True)
        z2 = net.embed(x)
    assert logits.shape == (2, 4, 37, 50)
    assert z.shape == (2, 8, 37, 50) and net.embedding_dim == 8
    torch.testing.assert_close(logits, logits2, rtol=0, atol=0)
    torch.testing.assert_close(z, z2, rtol=0, atol=0)
    torch.testing.assert_close(net.classify_embedding(z), logits, rtol=0, atol=1e-6)
    assert torch.isfinite(logits).all()


def test_3d_odd_size_shapes():
    net = ResidualUNet(3, 1, 2, channels=(4, 8, 16), res_units=1).eval()
    with torch.no_grad():
        logits, z = net(torch.randn(1, 1, 19, 23, 30), return_embedding=True)
    assert logits.shape == (1, 2, 19, 23, 30)
    assert z.shape == (1, 4, 19, 23, 30)


def test_padded_shape_hand_values():
    net = _net2d(channels=(4, 8, 16, 32))  # divisor 8, minimum 16 per axis
    assert net.size_divisor == 8
    assert net.padded_shape((37, 50)) == (40, 56)
    assert net.padded_shape((64, 64)) == (64, 64)
    assert net.padded_shape((1, 3)) == (16, 16)
    assert net.padded_shape((17, 16)) == (24, 16)
    assert _net2d(channels=(4,)).padded_shape((1, 5)) == (2, 5)


def test_no_padding_size_matches_cropped_result_of_padded_input():
    """An input already at a valid size is not padded: padding it by hand to the size the
    network would choose for the cropped input gives the same central output."""
    net = _net2d().eval()  # divisor 4, minimum 8
    x = torch.randn(1, 1, 14, 10)
    padded = F.pad(x, (1, 1, 1, 1))  # (16, 12): already valid, so used unchanged
    assert net.padded_shape((14, 10)) == (16, 12)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(padded)[:, :, 1:15, 1:11], rtol=0, atol=1e-6)


def test_classify_flat_vectors_equals_conv_classifier():
    net = ResidualUNet(2, 2, 5, channels=(6, 12), res_units=1).eval()
    x = torch.randn(2, 2, 11, 9)
    with torch.no_grad():
        logits, z = net(x, return_embedding=True)
        flat = z.permute(0, 2, 3, 1).reshape(-1, net.embedding_dim)
        flat_logits = net.classify_embedding(flat)
    assert flat_logits.shape == (2 * 11 * 9, 5)
    expected = logits.permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.max(torch.abs(flat_logits - expected)).item() <= 1e-6
    # independent reference: W z + b with numpy
    w = net.classifier.weight.detach().numpy().reshape(5, 6)
    b = net.classifier.bias.detach().numpy()
    ref = flat.numpy().astype(np.float64) @ w.T.astype(np.float64) + b
    np.testing.assert_allclose(flat_logits.numpy(), ref, atol=1e-5)


def test_classify_embedding_keeps_gradient_to_vectors():
    net = _net2d()
    z = torch.randn(7, net.embedding_dim, requires_grad=True)
    net.classify_embedding(z).sum().backward()
    expected = net.classifier.weight.detach().reshape(3, -1).sum(0).expand(7, -1)
    torch.testing.assert_close(z.grad, expected)


def test_config_round_trip_loads_strict_state_dict():
    cfg = SegNetConfig(spatial_dims=2, in_channels=3, out_channels=4, channels=(4, 8, 16),
                       res_units=2, norm="group", dropout=0.1)
    net = ResidualUNet.from_config(cfg)
    assert net.to_config() == cfg
    rebuilt = ResidualUNet.from_config(net.to_config())
    n = sum(p.numel() for p in net.parameters())
    assert n == sum(p.numel() for p in rebuilt.parameters())
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), rebuilt.eval()(x), rtol=0, atol=0)
    # the dict form used by checkpoints (lists instead of tuples) rebuilds the same net
    d = {"spatial_dims": 2, "in_channels": 3, "out_channels": 4, "channels": [4, 8, 16],
         "res_units": 2, "norm": "group", "dropout": 0.1}
    assert ResidualUNet.from_config(SegNetConfig.from_dict(d)).to_config() == cfg


def test_from_config_rejects_other_types():
    with pytest.raises(InputError, match="SegNetConfig"):
        ResidualUNet.from_config({"spatial_dims": 2})


def test_gradient_reaches_every_parameter():
    net = ResidualUNet(2, 2, 3, channels=(4, 8, 16), res_units=2, norm="instance")
    x = torch.randn(2, 2, 16, 16)
    target = torch.randint(0, 3, (2, 16, 16))
    F.cross_entropy(net(x), target).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name


def _dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    inter = (pred & ref).sum().item()
    return 2.0 * inter / (pred.sum().item() + ref.sum().item())


def test_overfits_toy_image_label_pair():
    """Image: a bright ring; label: the filled disk. Thresholding the image gives Dice ~0.7,
    so reaching > 0.9 needs the network's spatial context, not only intensity."""
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    r2 = (yy - 11) ** 2 + (xx - 13) ** 2
    label = (r2 <= 49).long()
    ring = ((r2 <= 49) & (r2 >= 25)).float()
    gen = torch.Generator().manual_seed(3)
    image = (ring * 2.0 - 1.0 + 0.3 * torch.randn(24, 24, generator=gen))[None, None]
    assert _dice(image[0, 0] > 0, label == 1) < 0.8
    net = ResidualUNet(2, 1, 2, channels=(8, 16), res_units=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(net(image), label[None]).backward()
        opt.step()
    with torch.no_grad():
        pred = net.eval()(image).argmax(1)[0]
    assert _dice(pred == 1, label == 1) > 0.9


def test_forward_leaves_input_unchanged():
    net = _net2d()
    x = torch.randn(1, 1, 13, 9)
    before = x.clone()
    net(x, return_embedding=True)[0].sum().backward()
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    x_valid = torch.randn(1, 1, 16, 16)  # no padding path: the tensor goes straight in
    before = x_valid.clone()
    net(x_valid)
    torch.testing.assert_close(x_valid, before, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none", "Instance"])
@pytest.mark.parametrize("train", [True, False])
def test_norm_variants_tiny_inputs_batch_one(norm: str, train: bool):
    """Batch 1 with a 1x1 (and 1x1x1) input: the bottom level would be one voxel without the
    minimum padding; every norm must run in train and eval mode."""
    net2 = ResidualUNet(2, 1, 2, channels=(4, 8, 16, 32), res_units=1, norm=norm).train(train)
    net3 = ResidualUNet(3, 1, 2, channels=(4, 8), res_units=1, norm=norm).train(train)
    out2 = net2(torch.randn(1, 1, 1, 1))
    out3 = net3(torch.randn(1, 1, 1, 1, 1))
    assert out2.shape == (1, 2, 1, 1) and out3.shape == (1, 2, 1, 1, 1)
    assert torch.isfinite(out2).all() and torch.isfinite(out3).all()
    assert net2.norm == norm.lower()


def test_norm_layers_configuration():
    inst = make_norm("instance", 2, 8)
    assert isinstance(inst, torch.nn.InstanceNorm2d) and inst.affine
    assert not inst.track_running_stats
    group = make_norm("group", 3, 12)
    assert isinstance(group, torch.nn.GroupNorm) and group.num_groups == 4
    assert isinstance(make_norm("batch", 3, 4), torch.nn.BatchNorm3d)
    assert isinstance(make_norm("none", 2, 4), torch.nn.Identity)
    # convolutions followed by a norm carry no bias; without a norm they do
    assert _net2d(norm="instance").encoder[0].body[0][0].bias is None
    assert _net2d(norm="none").encoder[0].body[0][0].bias is not None


def test_dropout_active_only_in_training():
    net = _net2d(dropout=0.5)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), net(x), rtol=0, atol=0)
        assert not torch.equal(net.train()(x), net.train()(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(spatial_dims=1), "spatial_dims"),
    (dict(spatial_dims=4), "spatial_dims"),
    (dict(channels=()), "channels is empty"),
    (dict(channels=(8, 0)), "channels"),
    (dict(norm="layer"), "Unknown norm"),
    (dict(res_units=0), "res_units"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=2.5), "out_channels"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_invalid_arguments_raise_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        _net2d(**kwargs)


def test_invalid_inputs_raise_input_error():
    net = _net2d()
    with pytest.raises(InputError, match="4 dimensions"):
        net(torch.randn(1, 8, 8))
    with pytest.raises(InputError, match="input channel"):
        net(torch.randn(1, 2, 8, 8))
    with pytest.raises(InputError, match="empty axis"):
        net(torch.randn(1, 1, 0, 8))
    with pytest.raises(InputError, match="Embeddings"):
        net.classify_embedding(torch.randn(5, net.embedding_dim + 1))
    with pytest.raises(InputError, match="Embeddings"):
        net.classify_embedding(torch.randn(1, net.embedding_dim, 4, 4, 4))


def test_default_net_trains_a_64x64_batch():
    """The default widths (16, 32, 64, 128) in 2D take a training step on 64x64 patches."""
    net = ResidualUNet(2, 3, 2)
    assert net.channels == (16, 32, 64, 128) and net.embedding_dim == 16
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 64, 64)
    y = torch.randint(0, 2, (4, 64, 64))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
