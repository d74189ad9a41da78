"""Sliced Wasserstein distance (SFUDASegmentLib.gmm.swd): exact 1D values, properties, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.gmm.swd import random_directions, sliced_wasserstein, wasserstein_1d_sorted


def reference_wp_power(a: np.ndarray, b: np.ndarray, p: float) -> float:
    """W_p^p by brute force: quantile functions on the n*m equal sub-intervals of [0, 1].

    Every sub-interval ((k)/(nm), (k+1)/(nm)] lies inside one constant piece of both
    quantile functions, so averaging at the midpoints is exact.
    """
    a, b = np.sort(a), np.sort(b)
    n, m = len(a), len(b)
    u = (np.arange(n * m) + 0.5) / (n * m)
    qa = a[np.floor(u * n).astype(int)]
    qb = b[np.floor(u * m).astype(int)]
    return float(np.mean(np.abs(qa - qb) ** p))


def test_random_directions_are_unit_and_reproducible():
    d1 = random_directions(5, 40, torch.Generator().manual_seed(3))
    d2 = random_directions(5, 40, torch.Generator().manual_seed(3))
    d3 = random_directions(5, 40, torch.Generator().manual_seed(4))
    assert d1.shape == (40, 5) and d1.dtype == torch.float32
    torch.testing.assert_close(d1.norm(dim=1), torch.ones(40), rtol=0, atol=1e-6)
    assert torch.equal(d1, d2)
    assert not torch.allclose(d1, d3)
    # roughly isotropic: the mean direction of many is near 0
    many = random_directions(3, 20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(many.mean(dim=0).abs().max()) < 0.03
    with pytest.raises(InputError):
        random_directions(0, 3)


def test_hand_example_unequal_sizes_p1_and_p2():
    # Q_a: (0,1/2]->0, (1/2,1]->1; Q_b: (0,1/3]->0, (1/3,2/3]->1, (2/3,1]->3.
    # Pieces: (0,1/3] 0 vs 0; (1/3,1/2] 0 vs 1 (len 1/6); (1/2,2/3] 1 vs 1; (2/3,1] 1 vs 3 (len 1/3).
    # W1 = 1/6 * 1 + 1/3 * 2 = 5/6 ; W2^2 = 1/6 * 1 + 1/3 * 4 = 3/2.
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, 0.0, 1.0]], dtype=torch.float64)
    assert float(wasserstein_1d_sorted(a, b, p=1)) == pytest.approx(5 / 6, abs=1e-12)
    assert float(wasserstein_1d_sorted(a, b, p=2)) == pytest.approx(3 / 2, abs=1e-12)
    assert scipy.stats.wasserstein_distance([0, 1], [0, 1, 3]) == pytest.approx(5 / 6)


def test_equal_sizes_is_mean_of_sorted_differences():
    a = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 5.0, 1.0], [1.0, -1.0, 3.0]], dtype=torch.float64)
    # row 0: sorted (1,2,3) vs (0,1,5): diffs 1,1,-2 -> (1+1+4)/3 = 2
    # row 1: sorted (0,0,0) vs (-1,1,3): diffs 1,-1,-3 -> (1+1+9)/3 = 11/3
    torch.testing.assert_close(wasserstein_1d_sorted(a, b, p=2),
                               torch.tensor([2.0, 11 / 3], dtype=torch.float64))


@pytest.mark.parametrize("n,m", [(7, 11), (13, 5), (1, 4), (9, 9)])
def test_one_dimensional_matches_scipy_for_p1(n, m):
    rng = np.random.default_rng(n * 100 + m)
    x = rng.normal(size=n)
    y = rng.gamma(2.0, size=m) - 1.0
    expected = scipy.stats.wasserstein_distance(x, y)
    xt = torch.tensor(x).reshape(n, 1)
    yt = torch.tensor(y).reshape(m, 1)
    # explicit +1 direction, and random directions (in 1D they are all +-1)
    got_fixed = sliced_wasserstein(xt, yt, p=1, directions=torch.ones(1, 1, dtype=torch.float64))
    got_random = sliced_wasserstein(xt, yt, projections=17, p=1,
                                    generator=torch.Generator().manual_seed(1))
    assert float(got_fixed) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert float(got_random) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_unequal_sizes_exact_against_brute_force(p):
    rng = np.random.default_rng(int(p))
    a = rng.normal(size=(4, 6))
    b = rng.normal(loc=0.5, size=(4, 10))
    got = wasserstein_1d_sorted(torch.tensor(a), torch.tensor(b), p=p)
    expected = [reference_wp_power(a[i], b[i], p) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_zero_for_identical_and_permuted_samples():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert float(sliced_wasserstein(x, x, generator=torch.Generator().manual_seed(1))) == 0.0
    shuffled = x[torch.randperm(50, generator=torch.Generator().manual_seed(2))]
    assert float(sliced_wasserstein(x, shuffled, generator=torch.Generator().manual_seed(1))) \
        == pytest.approx(0.0, abs=1e-12)
    # a sample and itself repeated twice are the same distribution
    assert float(sliced_wasserstein(x, torch.cat([x, x]), generator=torch.Generator().manual_seed(1))) \
        == pytest.approx(0.0, abs=1e-10)


def test_pure_shift_equals_mean_squared_projection_and_grows():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    directions = random_directions(3, 30, torch.Generator().manual_seed(6), dtype=torch.float64)
    shift_dir = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    values = []
    for s in [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]:
        shift = s * shift_dir
        value = sliced_wasserstein(x, x + shift, p=2, directions=directions)
        # a translation moves every projection by <theta, shift>: W2^2 = <theta, shift>^2
        assert float(value) == pytest.approx(float(((directions @ shift) ** 2).mean()), rel=1e-10, abs=1e-14)
        values.append(float(value))
    assert all(b > a for a, b in zip(values, values[1:]))
    # the same holds with unequal sizes (shift of the second sample only)
    y = torch.randn(40, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grown = [float(sliced_wasserstein(x, y + s * shift_dir, directions=directions))
             for s in [2.0, 3.0, 5.0, 8.0]]
    assert all(b > a for a, b in zip(grown, grown[1:]))


def test_symmetric():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(8))
    y = torch.randn(45, 5, generator=torch.Generator().manual_seed(9)) * 2 + 1
    directions = random_directions(5, 50, torch.Generator().manual_seed(10))
    for p in (1.0, 2.0):
        torch.testing.assert_close(sliced_wasserstein(x, y, p=p, directions=directions),
                                   sliced_wasserstein(y, x, p=p, directions=directions))


def test_reproducible_with_generator():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(8))
    y = torch.randn(20, 5, generator=torch.Generator().manual_seed(9)) + 1
    first = sliced_wasserstein(x, y, projections=20, generator=torch.Generator().manual_seed(11))
    again = sliced_wasserstein(x, y, projections=20, generator=torch.Generator().manual_seed(11))
    other = sliced_wasserstein(x, y, projections=20, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # equals the explicit-directions call with the same draw
    directions = random_directions(5, 20, torch.Generator().manual_seed(11))
    torch.testing.assert_close(first, sliced_wasserstein(x, y, directions=directions))


def test_differentiable_and_adam_reduces_it():
    gen = torch.Generator().manual_seed(13)
    y = torch.randn(80, 4, generator=gen) * 0.5 + torch.tensor([2.0, -1.0, 0.0, 1.0])
    x = torch.randn(60, 4, generator=gen).requires_grad_(True)
    directions = random_directions(4, 64, torch.Generator().manual_seed(14))
    value = sliced_wasserstein(x, y, directions=directions)
    value.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert float(x.grad.abs().sum()) > 0
    before = float(value.detach())
    optimizer = torch.optim.Adam([x], lr=0.05)
    step_gen = torch.Generator().manual_seed(15)
    for _ in range(30):
        optimizer.zero_grad()
        sliced_wasserstein(x, y, projections=32, generator=step_gen).backward()
        optimizer.step()
    after = float(sliced_wasserstein(x.detach(), y, directions=directions))
    assert after < 0.5 * before


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    directions = random_directions(2, 6, torch.Generator().manual_seed(17), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: sliced_wasserstein(t, y, directions=directions), (x,))


def test_rejects_bad_shapes():
    with pytest.raises(InputError, match="same D"):
        sliced_wasserstein(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(InputError, match="directions"):
        sliced_wasserstein(torch.zeros(4, 3), torch.zeros(4, 3), directions=torch.ones(2, 2))
    with pytest.raises(InputError, match="empty"):
        wasserstein_1d_sorted(torch.zeros(2, 0), torch.zeros(2, 3))
    with pytest.raises(InputError, match="same L"):
        wasserstein_1d_sorted(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(InputError, match="p must be"):
        wasserstein_1d_sorted(torch.zeros(2, 3), torch.zeros(2, 3), p=0.5)
