"""Distance of each voxel's embedding to the source class Gaussians (Lee et al., NeurIPS 2018).

The GMM prototypes in a checkpoint are one Gaussian ``N(mu_c, Sigma_c)`` per class of the
source embedding (the decoder output before the 1x1 classifier, see ``gmm/prototypes.py``). A
voxel whose embedding is far from every class Gaussian looks like nothing the source model
was trained on, however confident its softmax is: a source-free out-of-distribution score that
does not depend on the model's confidence.

``d(v) = min_c sqrt((z_v - mu_c)^T Sigma_c^-1 (z_v - mu_c))``; for a voxel drawn from class c's
Gaussian, ``d^2`` follows a chi-square law with D degrees of freedom (D = embedding width).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..config import InputSpec
from ..errors import InputError
from ..gmm.embeddings import input_batches
from ..gmm.prototypes import ClassPrototypes
from ..utils.device import autocast
from ..utils.progress import ProgressReporter, report


def whitening_factors(prototypes: ClassPrototypes) -> tuple[torch.Tensor, torch.Tensor]:
    """Means ``(K, D)`` and inverse Cholesky factors ``W_c = L_c^-1`` ``(K, D, D)`` (float64),
    so that ``d_c(z)^2 = |W_c (z - mu_c)|^2``."""
    covariances = prototypes.covariances.to(torch.float64)
    factors = torch.linalg.cholesky(covariances)
    identity = torch.eye(covariances.shape[-1], dtype=torch.float64).expand_as(covariances)
    return prototypes.means.to(torch.float64), torch.linalg.solve_triangular(factors, identity, upper=False)


def nearest_class_distance(embeddings: torch.Tensor, prototypes: ClassPrototypes) -> torch.Tensor:
    """Mahalanobis distance of each embedding to its nearest class Gaussian.

    Args:
        embeddings: ``(N, D)``.
        prototypes: the checkpoint's class Gaussians (D must match).

    Returns:
        ``(N,)`` float32 distances (not squared).

    Raises:
        InputError: the embedding width is not the prototypes' D.
    """
    if embeddings.ndim != 2 or embeddings.shape[1] != prototypes.embedding_dim:
        raise InputError(f"Embeddings must be (N, {prototypes.embedding_dim}) for these prototypes, got "
                         f"{tuple(embeddings.shape)}.")
    means, whiteners = whitening_factors(prototypes)
    z = embeddings.to(torch.float64)
    best = torch.full((z.shape[0],), float("inf"), dtype=torch.float64, device=z.device)
    for mean, whitener in zip(means.to(z.device), whiteners.to(z.device)):
        squared = ((z - mean) @ whitener.T).pow(2).sum(dim=1)
        best = torch.minimum(best, squared)
    return best.sqrt().to(torch.float32)


@torch.no_grad()
def mahalanobis_map(model: torch.nn.Module, image: np.ndarray, spec: InputSpec, prototypes: ClassPrototypes,
                    device: torch.device, batch_size: int = 4, amp: bool = True,
                    progress: Optional[ProgressReporter] = None) -> np.ndarray:
    """Nearest-class Mahalanobis distance of every voxel of a network-grid image.

    The embedding is computed as when the prototypes were fitted (``gmm.fitting``): whole
    slices for a 2D / 2.5D network, non-overlapping patches of the spec's patch size (the
    image edge-padded to a multiple) for a 3D network.

    Args:
        model: the segmentation network whose embedding is measured (the source network, or
            an adapted one), eval mode, on ``device``.
        image: ``(C, Z, Y, X)`` normalised image on the network grid.
        spec: the checkpoint's input spec.
        prototypes: the source class Gaussians.
        device: compute device.
        batch_size: slices or patches per forward pass.
        amp: mixed precision on GPU.
        progress: progress reporter (stage ``"mahalanobis"``).

    Returns:
        ``(Z, Y, X)`` float32 distances.
    """
    depth, height, width = image.shape[1:]
    if spec.dims != "3d":
        out = np.empty((depth, height, width), dtype=np.float32)
        z0 = 0
        for x, _ in input_batches(image, spec, batch_size):
            with autocast(device, amp):
                z = model.embed(x.to(device)).float()
            flat = z.movedim(1, -1).reshape(-1, z.shape[1])
            out[z0:z0 + len(x)] = nearest_class_distance(flat, prototypes).reshape(len(x), height, width).cpu().numpy()
            z0 += len(x)
            report(progress, "mahalanobis", z0 / depth, f"slices {z0}/{depth}")
        return out
    patch = tuple(spec.patch_size)
    padded = tuple(-(-s // p) * p for s, p in zip(image.shape[1:], patch))
    out = np.empty(padded, dtype=np.float32)
    corners = [(a, b, c) for a in range(0, padded[0], patch[0]) for b in range(0, padded[1], patch[1])
               for c in range(0, padded[2], patch[2])]
    done = 0
    for x, _ in input_batches(image, spec, batch_size):
        with autocast(device, amp):
            z = model.embed(x.to(device)).float()
        flat = z.movedim(1, -1).reshape(-1, z.shape[1])
        distances = nearest_class_distance(flat, prototypes).reshape(len(x), *patch).cpu().numpy()
        for corner, values in zip(corners[done:done + len(x)], distances):
            out[tuple(slice(c, c + p) for c, p in zip(corner, patch))] = values
        done += len(x)
        report(progress, "mahalanobis", done / len(corners), f"patches {done}/{len(corners)}")
    return out[:depth, :height, :width]
