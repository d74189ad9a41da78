"""Sliced Wasserstein distance between two point clouds (differentiable, PyTorch).

SFS aligns the target embeddings with samples of the source prototypes by the sliced
Wasserstein distance: both clouds are projected on ``L`` random unit directions and the 1D
Wasserstein distances of the projections are averaged. In 1D the optimal transport between two
empirical distributions matches their quantile functions, so a sort is all it takes.

Conventions:
    * :func:`wasserstein_1d_sorted` returns the **p-th power** ``W_p^p`` per row
      (for ``p = 1`` that is ``W_1`` itself).
    * :func:`sliced_wasserstein` returns ``mean over directions of W_p^p`` (for ``p = 2`` the
      averaged *squared* distance that SFS minimises), **not** its p-th root.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError


def random_directions(dim: int, count: int, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device | str] = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``count`` directions drawn uniformly on the unit sphere of ``R^dim``.

    Normalised standard Gaussian vectors are uniform on the sphere. The draw is made on the
    generator's device (so a seeded CPU generator gives the same directions whatever
    ``device`` is), then moved to ``device``.

    Returns:
        ``(count, dim)`` tensor of unit row vectors.

    Raises:
        InputError: ``dim`` or ``count`` below 1.
    """
    if int(dim) < 1 or int(count) < 1:
        raise InputError(f"random_directions needs dim >= 1 and count >= 1, got dim={dim}, "
                         f"count={count}. Pass the embedding dimension and the number of "
                         "projections (SFS uses 100).")
    draw_device = generator.device if generator is not None else device
    gaussian = torch.randn(int(count), int(dim), generator=generator, device=draw_device,
                           dtype=torch.float64)
    norms = gaussian.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (gaussian / norms).to(device=device, dtype=dtype)


def _quantile_pieces(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Common refinement of the quantile functions of an n-point and an m-point sample.

    The quantile function of ``n`` equally weighted points is constant on ``((i)/n, (i+1)/n]``.
    Merging the breakpoints ``i/n`` and ``j/m`` (integers ``i*m`` and ``j*n`` over the common
    denominator ``n*m``, so the merge is exact) gives intervals on which both are constant.

    Returns:
        ``(index_a, index_b, length)``: for every interval, the sorted-sample index of each
        distribution and the interval's length (a fraction of [0, 1], float64).
    """
    breaks = torch.unique(torch.cat([torch.arange(n + 1, device=device) * m,
                                     torch.arange(m + 1, device=device) * n]))  # sorted, int64
    left = breaks[:-1]
    length = (breaks[1:] - left).to(torch.float64) / float(n * m)
    return torch.div(left, m, rounding_mode="floor"), torch.div(left, n, rounding_mode="floor"), length


def wasserstein_1d_sorted(a: torch.Tensor, b: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Row-wise ``W_p^p`` between two 1D empirical distributions (uniform weights).

    ``W_p^p = integral_0^1 |Q_a(u) - Q_b(u)|^p du`` with ``Q`` the (piecewise-constant) quantile
    functions. Equal sizes: the mean of ``|sort(a) - sort(b)|^p``. Unequal sizes: the integral
    is evaluated exactly on the merged CDF breakpoints of both samples (at most ``N + M - 1``
    pieces), not approximated on a grid.

    Args:
        a: ``(L, N)`` values, one distribution per row (unsorted is fine).
        b: ``(L, M)`` values.
        p: exponent ``>= 1``.

    Returns:
        ``(L,)`` tensor of ``W_p^p`` (the p-th power, not the distance). Differentiable with
        respect to ``a`` and ``b``.

    Raises:
        InputError: not 2D, different row counts, an empty side, or ``p < 1``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise InputError(f"wasserstein_1d_sorted expects a (L, N) and b (L, M) with the same L, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}. Project both samples on "
                         "the same directions first.")
    if a.shape[1] == 0 or b.shape[1] == 0:
        raise InputError("wasserstein_1d_sorted got an empty sample; both sides need at least "
                         "one point.")
    if float(p) < 1.0:
        raise InputError(f"Wasserstein exponent p must be >= 1, got {p}.")
    a_sorted = torch.sort(a, dim=1).values
    b_sorted = torch.sort(b, dim=1).values
    n, m = a.shape[1], b.shape[1]
    if n == m:
        return _power(a_sorted - b_sorted, p).mean(dim=1)
    index_a, index_b, length = _quantile_pieces(n, m, a.device)
    differences = a_sorted[:, index_a] - b_sorted[:, index_b]
    return (_power(differences, p) * length.to(differences.dtype)).sum(dim=1)


def _power(x: torch.Tensor, p: float) -> torch.Tensor:
    """``|x|^p`` with the exact square for ``p = 2`` and the plain absolute value for ``p = 1``."""
    if float(p) == 2.0:
        return x * x
    if float(p) == 1.0:
        return x.abs()
    return x.abs().pow(float(p))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 100, p: float = 2.0,
                       generator: Optional[torch.Generator] = None,
                       directions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sliced Wasserstein discrepancy: the mean over directions of ``W_p^p`` of the projections.

    ``SW = (1/L) sum_l W_p^p(<theta_l, x>, <theta_l, y>)``. With ``p = 2`` this is the averaged
    squared distance SFS minimises; take ``SW ** (1/p)`` for a distance in embedding units.

    Args:
        x: ``(N, D)`` first sample (e.g. target embeddings).
        y: ``(M, D)`` second sample (e.g. draws from the prototypes); ``M`` may differ from ``N``.
        projections: ``L``, the number of random directions (ignored when ``directions`` given).
        p: Wasserstein exponent (>= 1).
        generator: seeds the directions (SFS redraws them every iteration: pass a generator
            that advances, or fixed ``directions`` to compare values).
        directions: ``(L, D)`` unit vectors to use instead of random ones.

    Returns:
        0-dim tensor, differentiable with respect to ``x`` and ``y``.

    Raises:
        InputError: shapes that do not fit.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise InputError(f"sliced_wasserstein expects x (N, D) and y (M, D) with the same D, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}. Flatten the embeddings to "
                         "(voxels, channels) and check that the prototypes were fitted on the "
                         "same layer.")
    dim = x.shape[1]
    if directions is None:
        directions = random_directions(dim, projections, generator, x.device, x.dtype)
    elif directions.dim() != 2 or directions.shape[1] != dim:
        raise InputError(f"directions must be (L, {dim}), got {tuple(directions.shape)}.")
    directions = directions.to(device=x.device, dtype=x.dtype)
    projected_x = directions @ x.transpose(0, 1)                      # (L, N)
    projected_y = directions @ y.to(x.dtype).transpose(0, 1)          # (L, M)
    return wasserstein_1d_sorted(projected_x, projected_y, p).mean()
