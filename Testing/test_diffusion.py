"""Conditional diffusion: schedule, loss, DDPM/DDIM samplers, network, EMA and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from SFUDASegmentLib.config import DiffusionNetConfig, DiffusionTrainingConfig, ScheduleConfig
from SFUDASegmentLib.diffusion.sampling import DDIMSampler, DDPMSampler, NoiseSchedule, diffusion_loss
from SFUDASegmentLib.diffusion.training import (PAD_INTENSITY, _PatchSampler, image_to_unit_range,
                                                make_condition, train_diffusion, unit_range_to_image)
from SFUDASegmentLib.errors import InputError, OperationCancelled
from SFUDASegmentLib.nets.diffusion_unet import ConditionalDiffusionUNet, group_count
from SFUDASegmentLib.training.ema import ExponentialMovingAverage
from SFUDASegmentLib.utils.device import inference_layout
from SFUDASegmentLib.utils.progress import ProgressReporter
from tiny_models import single_thread  # noqa: F401

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=4)


class Oracle:
    """The exact noise predictor for a dataset made of the single image ``x0``."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule) -> None:
        self.x0 = x0.double()
        self.abar = schedule.alphas_cumprod

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t.cpu()].reshape(-1, *([1] * (x_t.ndim - 1)))
        eps = (x_t.double() - abar.sqrt() * self.x0) / (1.0 - abar).sqrt()
        return eps.to(x_t.dtype)


def randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (including the zero-initialised ones) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return net


# ----------------------------------------------------------------------------- schedule

def test_cosine_schedule_matches_closed_form():
    T, s = 250, 0.008
    schedule = NoiseSchedule(T, "cosine", s)

    def f(t):
        return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2

    for t in (1, 2, 50, 125, 249):
        assert schedule.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-12)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert torch.all(schedule.betas > 0) and torch.all(schedule.betas <= 0.999)
    assert schedule.betas[-1].item() == 0.999  # f(T) = 0: the last beta is clipped
    assert torch.allclose(schedule.alphas, 1 - schedule.betas)
    assert torch.allclose(schedule.alphas_cumprod, torch.cumprod(schedule.alphas, 0))
    assert NoiseSchedule.from_config(ScheduleConfig()).to_config() == ScheduleConfig()


def test_linear_schedule_ends_and_bad_input():
    assert NoiseSchedule(1000, "linear").betas[[0, -1]].tolist() == pytest.approx([1e-4, 2e-2])
    assert NoiseSchedule(250, "linear").betas[[0, -1]].tolist() == pytest.approx([4e-4, 8e-2])
    with pytest.raises(InputError, match="Unknown noise schedule"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(InputError, match="at least 1"):
        NoiseSchedule(0)


def test_q_sample_then_predict_x0_round_trip():
    schedule = NoiseSchedule(50)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((3, 2, 4, 5), generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 17, 49])
    x_t = schedule.q_sample(x0, t, noise)
    abar = schedule.alphas_cumprod[17].item()
    assert torch.allclose(x_t[1], math.sqrt(abar) * x0[1] + math.sqrt(1 - abar) * noise[1], atol=1e-14)
    assert torch.allclose(schedule.predict_x0(x_t, t, noise), x0, atol=1e-10)
    assert torch.allclose(schedule.predict_eps(x_t, t, x0), noise, atol=1e-10)


def test_posterior_equals_product_of_gaussians():
    """q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1})."""
    schedule = NoiseSchedule(4)
    b = schedule.betas.tolist()
    t = 2
    a_t, abar_prev = 1 - b[t], (1 - b[0]) * (1 - b[1])
    x0, x_t = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.7]], dtype=torch.float64)
    precision = 1 / (1 - abar_prev) + a_t / b[t]
    expected_mean = (math.sqrt(abar_prev) * 0.3 / (1 - abar_prev) + math.sqrt(a_t) * -0.7 / b[t]) / precision
    mean, variance, log_variance = schedule.q_posterior(x0, x_t, torch.tensor([t]))
    assert mean.item() == pytest.approx(expected_mean, rel=1e-12)
    assert variance.item() == pytest.approx(1 / precision, rel=1e-12)
    assert log_variance.item() == pytest.approx(math.log(1 / precision), rel=1e-12)
    mean0, variance0, _ = schedule.q_posterior(x0, x_t, torch.tensor([0]))
    assert mean0.item() == pytest.approx(0.3) and variance0.item() == 0.0


# ----------------------------------------------------------------------------- loss

def test_diffusion_loss_is_zero_for_the_oracle_and_reproducible():
    schedule = NoiseSchedule(30)
    x0 = torch.linspace(-0.9, 0.9, 20).reshape(1, 1, 4, 5).repeat(3, 1, 1, 1)
    cond = torch.zeros((3, 2, 4, 5))
    for kind in ("l1", "l2"):
        loss = diffusion_loss(Oracle(x0[:1], schedule), x0, cond, schedule,
                              torch.Generator().manual_seed(1), loss=kind)
        assert loss.item() < 1e-4
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    l2 = [diffusion_loss(zero, x0, cond, schedule, torch.Generator().manual_seed(4), "l2") for _ in range(2)]
    noise = torch.randn(x0.shape, generator=_after_randint(4, 3, 30))
    assert l2[0].item() == l2[1].item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    with pytest.raises(InputError, match="Unknown diffusion loss"):
        diffusion_loss(zero, x0, cond, schedule, loss="huber")


def _after_randint(seed: int, batch: int, T: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    torch.randint(0, T, (batch,), generator=generator)
    return generator


# ----------------------------------------------------------------------------- samplers

@pytest.mark.parametrize("sampler_kind", ["ddpm", "ddim"])
def test_samplers_recover_x0_with_the_oracle(sampler_kind):
    schedule = NoiseSchedule(50)
    x0 = (torch.rand((1, 2, 6, 5), generator=torch.Generator().manual_seed(3)) * 1.8 - 0.9)
    sampler = DDPMSampler(schedule) if sampler_kind == "ddpm" else DDIMSampler(schedule, steps=10, eta=0.0)
    cond = torch.zeros((2, 3, 6, 5))
    out = sampler.sample(Oracle(x0, schedule), cond, 2, torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 6, 5) and out.dtype == torch.float32
    assert torch.allclose(out, x0.expand(2, -1, -1, -1), atol=1e-4)
    assert sampler.num_steps == (50 if sampler_kind == "ddpm" else 10)


def test_ddim_timesteps_and_step_limits():
    schedule = NoiseSchedule(20)
    assert DDIMSampler(schedule, steps=4).timesteps_sequence == [19, 14, 9, 4]
    assert DDIMSampler(schedule, steps=20).timesteps_sequence == list(range(19, -1, -1))
    assert DDPMSampler(schedule).timesteps_sequence == list(range(19, -1, -1))
    with pytest.raises(InputError, match="T = 20"):
        DDIMSampler(schedule, steps=21)
    with pytest.raises(InputError, match="T = 20"):
        DDIMSampler(schedule, steps=0)


def test_ddim_eta_one_over_all_steps_equals_ddpm():
    """With eta = 1 and every timestep, DDIM's update is DDPM's posterior step (Song et al.)."""
    schedule = NoiseSchedule(20)
    net = randomised(ConditionalDiffusionUNet(spatial_dims=2, cond_channels=2, **TINY)).eval()
    cond = torch.rand((1, 2, 8, 8), generator=torch.Generator().manual_seed(2))
    ddpm = DDPMSampler(schedule).sample(net, cond, 1, torch.Generator().manual_seed(9))
    ddim = DDIMSampler(schedule, steps=20, eta=1.0).sample(net, cond, 1, torch.Generator().manual_seed(9))
    assert torch.allclose(ddpm, ddim, atol=1e-4)


def test_sampling_reproducible_per_seed_and_ddim_eta0_deterministic():
    schedule = NoiseSchedule(20)
    net = randomised(ConditionalDiffusionUNet(spatial_dims=2, cond_channels=2, **TINY))
    cond = torch.rand((2, 2, 7, 9), generator=torch.Generator().manual_seed(1))
    ddim = DDIMSampler(schedule, steps=5)
    generator = torch.Generator().manual_seed(7)
    a = ddim.sample(net, cond, 1, generator)
    # eta = 0 uses the generator for the initial noise only: the rest is deterministic.
    reference = torch.Generator().manual_seed(7)
    torch.randn((2, 1, 7, 9), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())
    assert torch.equal(a, ddim.sample(net, cond, 1, torch.Generator().manual_seed(7)))
    assert not torch.allclose(a, ddim.sample(net, cond, 1, torch.Generator().manual_seed(8)))
    ddpm = DDPMSampler(schedule)
    b = ddpm.sample(net, cond, 1, torch.Generator().manual_seed(7))
    assert torch.equal(b, ddpm.sample(net, cond, 1, torch.Generator().manual_seed(7)))
    assert not torch.allclose(b, ddpm.sample(net, cond, 1, torch.Generator().manual_seed(8)))
    assert a.abs().max() <= 1.0 and net.training  # training mode restored


def test_sampler_reports_progress_and_can_be_cancelled():
    schedule = NoiseSchedule(12)
    x0 = torch.zeros((1, 1, 4, 4))
    events = []
    DDIMSampler(schedule, steps=4).sample(Oracle(x0, schedule), torch.zeros((1, 2, 4, 4)), 1,
                                          progress=ProgressReporter(events.append))
    assert [e.stage for e in events] == ["diffusion"] * 4
    assert [e.fraction for e in events] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(OperationCancelled):
        DDPMSampler(schedule).sample(Oracle(x0, schedule), torch.zeros((1, 2, 4, 4)), 1,
                                     progress=ProgressReporter(should_cancel=lambda: True))


# ----------------------------------------------------------------------------- network

@pytest.mark.parametrize("dims,shape", [(2, (13, 10)), (3, (5, 7, 9))])
def test_network_accepts_odd_sizes(dims, shape):
    net = ConditionalDiffusionUNet(spatial_dims=dims, image_channels=2, cond_channels=3,
                                   base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                                   attention_levels=(2,), groups=32)
    out = net(torch.randn(2, 2, *shape), torch.tensor([0, 5]), torch.randn(2, 3, *shape))
    assert out.shape == (2, 2, *shape)
    assert torch.count_nonzero(out) == 0  # zero-initialised output: predicts no noise at first


def test_condition_and_timestep_influence_the_output():
    net = randomised(ConditionalDiffusionUNet(spatial_dims=2, cond_channels=3, **TINY))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 1, 9, 11), generator=gen)
    cond = torch.zeros((1, 3, 9, 11))
    cond[:, 0] = 1
    other = cond.clone()
    other[:, :, 2:6, 3:8] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    t = torch.tensor([4])
    base = net(x, t, cond)
    assert (base - net(x, t, other)).abs().max() > 1e-3
    assert (base - net(x, torch.tensor([40]), cond)).abs().max() > 1e-3


@pytest.mark.parametrize("dims,shape", [(2, (12, 10)), (3, (6, 8, 10))])
def test_inference_layout_changes_speed_not_the_output(dims, shape):
    net = randomised(ConditionalDiffusionUNet(spatial_dims=dims, cond_channels=3, **TINY)).eval()
    gen = torch.Generator().manual_seed(1)
    x, cond = torch.randn((2, 1, *shape), generator=gen), torch.rand((2, 3, *shape), generator=gen)
    t = torch.tensor([3, 17])
    with torch.no_grad():
        before = net(x, t, cond)
        assert inference_layout(net, "cpu", dims) is net
        after = net(x, t, cond)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    convolutions = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert convolutions and all(w.is_contiguous(memory_format=layout) and not w.is_contiguous()
                                for w in convolutions if w.shape[-1] > 1 and w.shape[1] > 1)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_network_config_round_trip_and_errors():
    config = DiffusionNetConfig(spatial_dims=2, cond_channels=4, base_channels=12, channel_mults=(1, 3),
                                num_res_blocks=1, groups=8)
    net = ConditionalDiffusionUNet.from_config(config)
    assert net.to_config() == config
    assert group_count(12, 8) == 6 and group_count(8, 32) == 8 and group_count(36, 32) == 18
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 for m in norms)
    # widths 12 and 36 -> 6 groups; skip concatenations 24, 48, 72 -> 8
    assert {(m.num_channels, m.num_groups) for m in norms} == {(12, 6), (36, 6), (24, 8), (48, 8), (72, 8)}
    with pytest.raises(InputError, match="spatial_dims"):
        ConditionalDiffusionUNet(spatial_dims=4)
    with pytest.raises(InputError, match="attention_levels"):
        ConditionalDiffusionUNet(channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(InputError, match="condition must have shape"):
        net(torch.zeros(1, 1, 8, 8), torch.tensor([1]), torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------- condition, EMA

def test_make_condition_hand_example():
    labels = torch.tensor([[[0, 1], [2, 0]]])
    foreground = torch.tensor([[[True, True], [False, False]]])
    cond = make_condition(labels, foreground, num_classes=3)
    expected = torch.tensor([[[[1, 0], [0, 1]],   # background
                              [[0, 1], [0, 0]],   # class 1
                              [[0, 0], [1, 0]],   # class 2
                              [[1, 0], [0, 0]]]],  # body: foreground and background label
                            dtype=torch.float32)
    assert cond.dtype == torch.float32 and torch.equal(cond, expected)
    with pytest.raises(InputError, match="0..2"):
        make_condition(labels + 1, foreground, num_classes=3)


def test_unit_range_mapping():
    z = np.array([-6.0, -1.5, 0.0, 3.0, 9.0], dtype=np.float32)
    kept = z.copy()
    u = image_to_unit_range(z)
    assert u.tolist() == [-1.0, -0.5, 0.0, 1.0, 1.0] and np.array_equal(z, kept)
    assert unit_range_to_image(u).tolist() == [-3.0, -1.5, 0.0, 3.0, 3.0]
    assert image_to_unit_range(torch.tensor([1.5]), scale=1.0).tolist() == [1.0]


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.register_buffer("count", torch.zeros(1))


def test_ema_hand_example():
    model = _WithBuffer()
    ema = ExponentialMovingAverage(model, decay=0.5)
    for value in (2.0, 4.0):
        with torch.no_grad():
            model.weight.fill_(value)
            model.count.fill_(value * 10)
        ema.update(model)
    # 0 -> 0.5*0 + 0.5*2 = 1 -> 0.5*1 + 0.5*4 = 2.5; the buffer is copied.
    assert ema.shadow["weight"].tolist() == [2.5, 2.5] and ema.shadow["count"].tolist() == [40.0]
    target = _WithBuffer()
    ema.copy_to(target)
    assert target.weight.tolist() == [2.5, 2.5]
    restored = ExponentialMovingAverage(_WithBuffer(), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.shadow["weight"].tolist() == [2.5, 2.5] and restored.num_updates == 2
    assert restored.decay == 0.5


def test_ema_warmup_hand_example():
    model = _WithBuffer()
    ema = ExponentialMovingAverage(model, decay=0.995, warmup=True)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)  # decay min(0.995, 1/10) = 0.1: 0.1*0 + 0.9*2 = 1.8
    assert ema.shadow["weight"][0].item() == pytest.approx(1.8)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)  # decay 2/11
    assert ema.shadow["weight"][0].item() == pytest.approx(2 / 11 * 1.8 + 9 / 11 * 4.0)


# ----------------------------------------------------------------------------- training

def _toy_samples(n: int, size: int = 16, seed: int = 0) -> list:
    """Images whose intensity is 0.8 * label - 0.4 (+ a little noise) inside a body mask."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        labels = np.zeros((size, size), dtype=np.int64)
        y, x = rng.integers(1, size - 6, size=2)
        labels[y:y + 6, x:x + 6] = 1
        foreground = np.zeros((size, size), dtype=bool)
        foreground[1:-1, 1:-1] = True
        image = np.where(foreground, 0.8 * labels - 0.4, -1.0) + rng.normal(0, 0.05, labels.shape)
        samples.append((np.clip(image, -1, 1).astype(np.float32)[None], labels, foreground))
    return samples


def test_train_diffusion_reduces_the_loss_and_returns_loadable_ema():
    samples = _toy_samples(12)
    copies = [tuple(a.copy() for a in s) for s in samples]
    net_config = DiffusionNetConfig(spatial_dims=2, image_channels=1, cond_channels=3, **TINY)
    events = []
    result = train_diffusion(samples, net_config, ScheduleConfig(timesteps=50),
                             DiffusionTrainingConfig(iterations=150, batch_size=4, lr=3e-3, device="cpu"),
                             patch_size=None, progress=ProgressReporter(events.append))
    assert len(result.losses) == 150 and events[-1].fraction == 1.0
    assert [e.done for e in events] == list(range(151)) and {e.total for e in events} == {150}
    assert {e.unit for e in events} == {"iterations"} and events[-1].rate > 0
    assert result.seconds > 0 and result.iterations_per_second == pytest.approx(150 / result.seconds)
    assert np.mean(result.losses[-20:]) < 0.8 * np.mean(result.losses[:20])
    net = ConditionalDiffusionUNet.from_config(result.net_config)
    net.load_state_dict(result.ema_state_dict, strict=True)
    assert result.schedule_config.timesteps == 50
    for original, kept in zip(samples, copies):
        assert all(np.array_equal(a, b) for a, b in zip(original, kept))


def test_train_diffusion_slices_volumes_and_pads_patches():
    rng = np.random.default_rng(1)
    volume = [(np.zeros((1, 3, 12, 10), np.float32), rng.integers(0, 2, (3, 12, 10)),
               np.ones((3, 12, 10), bool))]
    net_config = DiffusionNetConfig(spatial_dims=2, cond_channels=3, **TINY)
    result = train_diffusion(volume, net_config, ScheduleConfig(timesteps=10),
                             DiffusionTrainingConfig(iterations=2, batch_size=2, device="cpu"),
                             patch_size=(16, 8))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    with pytest.raises(InputError, match="class indices"):
        train_diffusion([(volume[0][0], volume[0][1] + 2, volume[0][2])], net_config, ScheduleConfig(10),
                        DiffusionTrainingConfig(iterations=1, device="cpu"))
    with pytest.raises(InputError, match="image_to_unit_range"):
        train_diffusion([(volume[0][0] + 3, volume[0][1], volume[0][2])], net_config, ScheduleConfig(10),
                        DiffusionTrainingConfig(iterations=1, device="cpu"))


def test_patches_keep_image_and_labels_aligned():
    samples = [(np.where(s[2], 0.8 * s[1] - 0.4, -1.0).astype(np.float32)[None], s[1], s[2])
               for s in _toy_samples(3, size=10)]
    config = DiffusionNetConfig(spatial_dims=2, cond_channels=3, **TINY)
    sampler = _PatchSampler(samples, config, (14, 6), np.random.default_rng(0))
    images, labels, masks = sampler.draw(16)
    assert images.shape == (16, 1, 14, 6) and labels.shape == masks.shape == (16, 14, 6)
    expected = np.where(masks, 0.8 * labels - 0.4, PAD_INTENSITY)
    assert np.allclose(images[:, 0], expected)
    assert np.all(~masks[:, :2]) and np.all(~masks[:, -2:])  # two padded rows on each side


def test_slices_of_volumes_are_drawn_where_the_body_is():
    body = np.zeros((8, 6, 6), bool)
    body[2, 1:4, 1:4] = body[5, 2:5, 2:5] = True
    image = np.where(body, 0.5, -1.0).astype(np.float32)[None]
    empty = np.zeros((4, 6, 6), bool)  # a volume without body: any slice
    samples = [(image, body.astype(np.int64), body), (np.full((1, 4, 6, 6), -1.0, np.float32), empty.astype(np.int64), empty)]
    config = DiffusionNetConfig(spatial_dims=2, cond_channels=3, **TINY)
    sampler = _PatchSampler(samples, config, (6, 6), np.random.default_rng(0))
    drawn = [sampler._choose() for _ in range(200)]
    assert {z for index, z, _, _ in drawn if index == 0} == {2, 5}
    assert {z for index, z, _, _ in drawn if index == 1} == {0, 1, 2, 3}
    images, _, masks = sampler.draw(40)
    assert all(m.any() or np.all(i == -1.0) for i, m in zip(images, masks))
