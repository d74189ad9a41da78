"""Class prototypes of SFS: one full-covariance Gaussian of the source embedding per class.

At source-training time the embedding (the decoder output before the 1x1 classifier) is
collected at voxels the source model gets right with confidence: ``label == c``,
``argmax prediction == c`` and ``max probability > rho`` (rho = 0.97). Every network class,
background (class 0) included, gets a Gaussian ``N(mu_c, Sigma_c)``; the mixture weight of a
class is its share of the selected voxels. At the target site the prototypes are sampled to
give labelled pseudo-source embeddings for the adaptation.

Memory stays bounded on any amount of data: per class a reservoir (Algorithm R) keeps a
uniform random subset of at most ``max_samples_per_class`` selected embeddings, while the
number of selected voxels is counted exactly (it sets the mixture weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import CheckpointError, InputError

PROTOTYPES_FORMAT = "sfs-class-gaussians"
PROTOTYPES_VERSION = 1
REFIT_HINT = "Re-run `sfuda fit-prototypes` with this checkpoint's model and the source data."

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclass
class ClassPrototypes:
    """Per-class Gaussians of the source embedding (the SFS prototypical distribution).

    Attributes:
        means: ``(K, D)`` float64, the class means.
        covariances: ``(K, D, D)`` float64, symmetric positive definite.
        weights: ``(K,)`` float64, mixture weights (class shares of the selected voxels), sum 1.
        class_indices: network class index of each component (0 = background), length K.
        counts: selected voxels per class (all of them, not only the reservoir), length K.
        rho: confidence threshold used for the selection.
        embedding_layer: name of the layer the embedding comes from, e.g. ``"decoder_final"``.
        embedding_dim: D.
        shrinkage: the covariance shrinkage used when fitting (see
            :meth:`PrototypeAccumulator.finalize`).
        label_counts: voxels per class in the source label maps (all labelled voxels, not only
            the confident ones), length K; None for prototypes fitted before it was recorded.
            Their shares are the source class priors: the confident-voxel ``weights``
            under-count hard classes (tumour classes: about 1e-4 of the confident voxels of a
            glioma scan, about 1e-2 of its labels).
    """

    means: torch.Tensor
    covariances: torch.Tensor
    weights: torch.Tensor
    class_indices: tuple[int, ...]
    counts: tuple[int, ...]
    rho: float
    embedding_layer: str
    embedding_dim: int
    shrinkage: float = 0.0
    label_counts: Optional[tuple[int, ...]] = None

    @property
    def label_shares(self) -> Optional[list[float]]:
        """``(K,)`` class shares of the source labels (``label_counts`` normalised), or None."""
        if self.label_counts is None:
            return None
        total = float(sum(self.label_counts))
        return [n / total for n in self.label_counts]

    @property
    def num_components(self) -> int:
        """K, the number of Gaussians (one per class)."""
        return len(self.class_indices)

    def validate(self) -> None:
        """Check shapes, finiteness, symmetry, positive definiteness and the weights.

        Raises:
            CheckpointError: naming the first problem found and the fix.
        """
        def fail(problem: str) -> None:
            raise CheckpointError(f"Invalid GMM prototypes: {problem}. {REFIT_HINT}")

        for name in ("means", "covariances", "weights"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                fail(f"'{name}' must be a floating-point tensor, got {type(value).__name__}"
                     + (f" of {value.dtype}" if isinstance(value, torch.Tensor) else ""))
        k = len(self.class_indices)
        d = int(self.embedding_dim)
        if k == 0:
            fail("there are no classes")
        if d < 1:
            fail(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if tuple(self.means.shape) != (k, d):
            fail(f"means have shape {tuple(self.means.shape)}, expected (classes, embedding_dim) "
                 f"= ({k}, {d})")
        if tuple(self.covariances.shape) != (k, d, d):
            fail(f"covariances have shape {tuple(self.covariances.shape)}, expected "
                 f"({k}, {d}, {d})")
        if tuple(self.weights.shape) != (k,):
            fail(f"weights have shape {tuple(self.weights.shape)}, expected ({k},)")
        if len(self.counts) != k:
            fail(f"{len(self.counts)} counts for {k} classes")
        if len(set(self.class_indices)) != k or any(int(c) < 0 for c in self.class_indices):
            fail(f"class indices {list(self.class_indices)} must be distinct and >= 0")
        if any(int(n) < 0 for n in self.counts):
            fail(f"counts {list(self.counts)} must be >= 0")
        if self.label_counts is not None and (len(self.label_counts) != k or any(int(n) < 0 for n in self.label_counts)
                                              or sum(self.label_counts) <= 0):
            fail(f"label counts {list(self.label_counts)} must be {k} values >= 0 with a positive sum")
        if not 0.0 <= float(self.rho) <= 1.0:
            fail(f"rho = {self.rho} is outside [0, 1]")
        for name in ("means", "covariances", "weights"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                fail(f"'{name}' contain NaN or infinite values")
        weights = self.weights.to(torch.float64)
        if bool((weights < 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-5:
            fail(f"mixture weights {weights.tolist()} must be >= 0 and sum to 1 "
                 f"(they sum to {float(weights.sum()):.6g})")
        covariances = self.covariances.to(torch.float64)
        for i, c in enumerate(self.class_indices):
            cov = covariances[i]
            scale = max(float(cov.abs().max()), 1e-30)
            if float((cov - cov.T).abs().max()) > 1e-6 * scale:
                fail(f"the covariance of class {c} is not symmetric")
            if int(torch.linalg.cholesky_ex(cov).info) != 0:
                fail(f"the covariance of class {c} is not positive definite")

    def to_state(self) -> dict[str, Any]:
        """A dict of tensors and plain values that ``torch.load(weights_only=True)`` accepts."""
        return {
            "format": PROTOTYPES_FORMAT,
            "version": PROTOTYPES_VERSION,
            "means": self.means.detach().cpu().clone(),
            "covariances": self.covariances.detach().cpu().clone(),
            "weights": self.weights.detach().cpu().clone(),
            "class_indices": [int(c) for c in self.class_indices],
            "counts": [int(n) for n in self.counts],
            "rho": float(self.rho),
            "embedding_layer": str(self.embedding_layer),
            "embedding_dim": int(self.embedding_dim),
            "shrinkage": float(self.shrinkage),
            **({} if self.label_counts is None else {"label_counts": [int(n) for n in self.label_counts]}),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "ClassPrototypes":
        """Rebuild from :meth:`to_state`'s dict, validating everything.

        Raises:
            CheckpointError: a missing or mistyped entry, another format or version, or
                prototypes that fail :meth:`validate`.
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(f"GMM prototypes must be stored as a dict, found "
                                  f"{type(state).__name__}. {REFIT_HINT}")
        if state.get("format") != PROTOTYPES_FORMAT:
            raise CheckpointError(f"The stored prototypes have format {state.get('format')!r}, "
                                  f"expected {PROTOTYPES_FORMAT!r}. {REFIT_HINT}")
        if state.get("version") != PROTOTYPES_VERSION:
            raise CheckpointError(f"The stored prototypes have version {state.get('version')!r}; "
                                  f"this library reads version {PROTOTYPES_VERSION}. {REFIT_HINT}")
        required = ("means", "covariances", "weights", "class_indices", "counts", "rho",
                    "embedding_layer", "embedding_dim")
        missing = [key for key in required if key not in state]
        if missing:
            raise CheckpointError(f"The stored prototypes lack {', '.join(missing)}. {REFIT_HINT}")
        try:
            prototypes = cls(
                means=state["means"], covariances=state["covariances"], weights=state["weights"],
                class_indices=tuple(_as_int(c) for c in state["class_indices"]),
                counts=tuple(_as_int(n) for n in state["counts"]),
                rho=float(state["rho"]), embedding_layer=str(state["embedding_layer"]),
                embedding_dim=_as_int(state["embedding_dim"]),
                shrinkage=float(state.get("shrinkage", 0.0)),
                label_counts=(None if state.get("label_counts") is None
                              else tuple(_as_int(n) for n in state["label_counts"])))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"The stored prototypes have a mistyped entry ({error}). "
                                  f"{REFIT_HINT}") from error
        prototypes.validate()
        return prototypes

    def allocate(self, total: int, proportions: Optional[Sequence[float]] = None) -> list[int]:
        """Split ``total`` samples over the classes in proportion (largest remainder rounding).

        Args:
            total: number of samples to draw in all.
            proportions: one non-negative value per component (in ``class_indices`` order);
                the mixture ``weights`` when None.

        Returns:
            Counts per component, summing to ``total``.
        """
        shares = (self.weights.to(torch.float64) if proportions is None
                  else torch.as_tensor(proportions, dtype=torch.float64).flatten())
        if shares.numel() != self.num_components or bool((shares < 0).any()) \
                or not bool(torch.isfinite(shares).all()) or float(shares.sum()) <= 0:
            raise InputError(f"Class proportions {shares.tolist()} must be {self.num_components} "
                             "finite non-negative values with a positive sum (one per class "
                             f"{list(self.class_indices)}).")
        if int(total) < 0:
            raise InputError(f"Cannot draw a negative number of samples ({total}).")
        exact = shares / shares.sum() * int(total)
        counts = torch.floor(exact).to(torch.int64)
        remainder = int(total) - int(counts.sum())
        order = torch.argsort(exact - counts.to(torch.float64), descending=True, stable=True)
        counts[order[:remainder]] += 1
        return [int(n) for n in counts]

    def sample(self, counts_per_class: Union[Mapping[int, int], Sequence[int]],
               generator: Optional[torch.Generator] = None,
               device: Optional[torch.device | str] = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw labelled embeddings from the class Gaussians: ``z = mu_c + L_c eps``.

        Args:
            counts_per_class: a dict ``{network class index: count}`` (absent classes get 0)
                or a sequence of K counts in ``class_indices`` order.
            generator: seeds the draw (made on the generator's device, then moved).
            device: where the returned tensors live (CPU when None).
            dtype: dtype of ``z``.

        Returns:
            ``z`` ``(N, D)`` and ``y`` ``(N,)`` int64 network class indices, grouped by class in
            ``class_indices`` order.

        Raises:
            InputError: unknown class, negative count or a sequence of the wrong length.
        """
        counts = self._counts_list(counts_per_class)
        total = sum(counts)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(total, self.embedding_dim, generator=generator, device=draw_device,
                          dtype=torch.float64)
        means = self.means.to(device=draw_device, dtype=torch.float64)
        factors = torch.linalg.cholesky(self.covariances.to(device=draw_device, dtype=torch.float64))
        pieces, labels, start = [], [], 0
        for k, n in enumerate(counts):
            pieces.append(means[k] + eps[start:start + n] @ factors[k].T)
            labels.append(torch.full((n,), int(self.class_indices[k]), dtype=torch.int64))
            start += n
        return torch.cat(pieces).to(device=device, dtype=dtype), torch.cat(labels).to(device=device)

    def _counts_list(self, counts_per_class: Union[Mapping[int, int], Sequence[int]]) -> list[int]:
        """Counts per component, in ``class_indices`` order, validated."""
        if isinstance(counts_per_class, Mapping):
            unknown = [c for c in counts_per_class if int(c) not in self.class_indices]
            if unknown:
                raise InputError(f"No prototype for class(es) {unknown}; the prototypes cover "
                                 f"classes {list(self.class_indices)}.")
            counts = [int(counts_per_class.get(c, 0)) for c in self.class_indices]
        else:
            counts = [int(n) for n in counts_per_class]
            if len(counts) != self.num_components:
                raise InputError(f"Got {len(counts)} sample counts for {self.num_components} "
                                 f"prototype classes {list(self.class_indices)}; give one count "
                                 "per class or a dict {class: count}.")
        if any(n < 0 for n in counts):
            raise InputError(f"Sample counts must be >= 0, got {counts}.")
        return counts

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for ``sfuda info``."""
        classes = []
        for k, c in enumerate(self.class_indices):
            cov = self.covariances[k].to(torch.float64)
            eigenvalues = torch.linalg.eigvalsh(cov)
            classes.append({
                "class_index": int(c),
                "weight": float(self.weights[k]),
                "selected_voxels": int(self.counts[k]),
                "label_share": None if self.label_shares is None else self.label_shares[k],
                "mean_norm": float(self.means[k].norm()),
                "covariance_trace": float(torch.trace(cov)),
                "covariance_condition": float(eigenvalues[-1] / eigenvalues[0]),
            })
        return {"format": PROTOTYPES_FORMAT, "version": PROTOTYPES_VERSION,
                "embedding_layer": self.embedding_layer, "embedding_dim": int(self.embedding_dim),
                "rho": float(self.rho), "shrinkage": float(self.shrinkage),
                "num_classes": self.num_components, "classes": classes}


def _as_int(value: Any) -> int:
    """An integer stored as int or 0-dim tensor; anything else is a TypeError."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise TypeError(f"expected an integer, got a tensor of shape {tuple(value.shape)}")
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


class _Reservoir:
    """Uniform random subset of at most ``capacity`` rows of a stream (Algorithm R).

    Item ``t`` (0-based) of the stream enters with probability ``capacity / (t + 1)`` and then
    replaces a uniformly chosen slot, so every item seen so far is kept with the same
    probability. A batch is processed at once; where several items of one batch pick the same
    slot the last one wins, exactly as one item after another would.
    """

    def __init__(self, capacity: int, dim: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.buffer = np.empty((0, dim), dtype=np.float32)

    @property
    def filled(self) -> int:
        """Number of rows held."""
        return min(self.seen, self.capacity)

    def add(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        """Offer ``rows`` ``(m, dim)`` float32 to the reservoir, in stream order."""
        filled = self.filled
        n_fill = min(len(rows), self.capacity - filled)
        if n_fill > 0:
            if filled + n_fill > len(self.buffer):
                grown = np.empty((min(self.capacity, max(2 * len(self.buffer), filled + n_fill)),
                                  self.buffer.shape[1]), dtype=np.float32)
                grown[:filled] = self.buffer[:filled]
                self.buffer = grown
            self.buffer[filled:filled + n_fill] = rows[:n_fill]
        rest = rows[n_fill:]
        if len(rest):
            positions = self.seen + n_fill + np.arange(len(rest))      # 0-based stream index
            slots = rng.integers(0, positions + 1)                      # uniform in [0, t]
            taken = np.nonzero(slots < self.capacity)[0]
            # keep the last item of the batch that chose each slot
            reversed_slots = slots[taken][::-1]
            unique_slots, first_in_reversed = np.unique(reversed_slots, return_index=True)
            self.buffer[unique_slots] = rest[taken[::-1][first_in_reversed]]
        self.seen += len(rows)

    def rows(self) -> np.ndarray:
        """The kept rows ``(filled, dim)`` (a view)."""
        return self.buffer[:self.filled]


class PrototypeAccumulator:
    """Streams (embedding, label, probability) patches and fits :class:`ClassPrototypes`.

    Args:
        num_classes: C, network classes including background (class 0).
        embedding_dim: D, channels of the embedding.
        rho: a voxel is used when ``label == argmax prob == c`` and ``max prob > rho``.
        max_samples_per_class: reservoir size per class; memory is
            ``O(num_classes * max_samples_per_class * D)`` float32 whatever the data size.
        seed: seeds the reservoir's random choices.
    """

    def __init__(self, num_classes: int, embedding_dim: int, rho: float = 0.97,
                 max_samples_per_class: int = 20000, seed: int = 0) -> None:
        if int(num_classes) < 1 or int(embedding_dim) < 1:
            raise InputError(f"num_classes and embedding_dim must be >= 1, got {num_classes} "
                             f"and {embedding_dim}.")
        if not 0.0 <= float(rho) < 1.0:
            raise InputError(f"rho must be in [0, 1), got {rho}; SFS uses 0.97.")
        if int(max_samples_per_class) < 2:
            raise InputError(f"max_samples_per_class must be >= 2 to estimate a covariance, got "
                             f"{max_samples_per_class}.")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.rho = float(rho)
        self.max_samples_per_class = int(max_samples_per_class)
        self._rng = np.random.default_rng(seed)
        self._reservoirs = [_Reservoir(self.max_samples_per_class, self.embedding_dim)
                            for _ in range(self.num_classes)]

    @property
    def selected_counts(self) -> list[int]:
        """Selected voxels per class so far (exact, including those not in the reservoir)."""
        return [r.seen for r in self._reservoirs]

    def samples(self, class_index: int) -> torch.Tensor:
        """A copy of the embeddings held for ``class_index``, ``(n, D)`` float32."""
        if not 0 <= int(class_index) < self.num_classes:
            raise InputError(f"Class {class_index} is outside 0..{self.num_classes - 1}.")
        return torch.from_numpy(self._reservoirs[int(class_index)].rows().copy())

    def add(self, embeddings: ArrayLike, labels: ArrayLike, probs: ArrayLike) -> None:
        """Add one batch of voxels.

        Args:
            embeddings: ``(B, D, *S)`` or ``(N, D)``.
            labels: ground-truth network class indices ``(B, *S)`` or ``(N,)``.
            probs: softmax probabilities ``(B, C, *S)`` or ``(N, C)``.

        Raises:
            InputError: shapes that do not match, labels outside ``0..C-1`` or not integers,
                probabilities that are not a softmax output, non-finite selected embeddings.
        """
        emb, lab, prob = self._flatten(embeddings, labels, probs)
        keep = (lab == prob.argmax(dim=1)) & (prob.amax(dim=1) > self.rho)
        for c in range(self.num_classes):
            mask = keep & (lab == c)
            if not bool(mask.any()):
                continue
            rows = emb[mask].detach().to(device="cpu", dtype=torch.float32).numpy()
            if not np.isfinite(rows).all():
                raise InputError(f"The embeddings of class {c} contain NaN or infinite values; "
                                 "check the network and its input normalisation.")
            self._reservoirs[c].add(rows, self._rng)

    def _flatten(self, embeddings: ArrayLike, labels: ArrayLike,
                 probs: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate and flatten to ``(N, D)``, ``(N,)``, ``(N, C)`` on the embeddings' device."""
        emb = torch.as_tensor(embeddings)
        lab = torch.as_tensor(labels).to(emb.device)
        prob = torch.as_tensor(probs).to(emb.device)
        d, c = self.embedding_dim, self.num_classes
        if emb.dim() < 2 or emb.shape[1] != d:
            raise InputError(f"Embeddings must be (B, {d}, *spatial) or (N, {d}), got "
                             f"{tuple(emb.shape)}; is the embedding layer the one the "
                             "accumulator was built for?")
        spatial = tuple(emb.shape[2:])
        batch = emb.shape[0]
        if tuple(lab.shape) != (batch, *spatial) or tuple(prob.shape) != (batch, c, *spatial):
            raise InputError(f"Labels {tuple(lab.shape)} and probabilities {tuple(prob.shape)} "
                             f"do not match embeddings {tuple(emb.shape)}: expected labels "
                             f"{(batch, *spatial)} and probabilities {(batch, c, *spatial)}.")
        if lab.is_floating_point():
            if not bool((lab == torch.round(lab)).all()):
                raise InputError("Labels must be integer class indices; got fractional values.")
        lab = lab.to(torch.int64)
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= c):
            raise InputError(f"Labels must be network class indices 0..{c - 1}, found values "
                             f"{int(lab.min())}..{int(lab.max())}; map label values (e.g. "
                             "BraTS 4) to consecutive indices first.")
        prob = prob.float()
        if prob.numel() and (not bool(torch.isfinite(prob).all()) or float(prob.min()) < -1e-3
                             or float(prob.max()) > 1 + 1e-3
                             or float((prob.sum(dim=1) - 1).abs().max()) > 1e-2):
            raise InputError("`probs` must be softmax probabilities over the class axis (values "
                             "in [0, 1] summing to 1); pass softmax(logits, dim=1), not logits.")
        return (emb.movedim(1, -1).reshape(-1, d), lab.reshape(-1),
                prob.movedim(1, -1).reshape(-1, c))

    def finalize(self, shrinkage: float = 1e-3, min_variance: float = 1e-6,
                 embedding_layer: str = "decoder_final") -> ClassPrototypes:
        """Fit one Gaussian per class on the kept embeddings.

        Mean and unbiased covariance ``S`` (float64) of each class's reservoir, then
        ``Sigma = (1 - shrinkage) * S + shrinkage * (trace(S) / D) * I + min_variance * I``:
        shrinkage towards the mean variance, plus an absolute floor so that ``Sigma`` is
        positive definite even when ``S`` is rank deficient or zero. Mixture weights are the
        exact selected-voxel shares (not the reservoir sizes).

        Raises:
            InputError: a class with fewer than 2 selected voxels (named, with the fix), or
                ``shrinkage`` outside [0, 1], or a negative ``min_variance``.
        """
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise InputError(f"shrinkage must be in [0, 1], got {shrinkage}.")
        if float(min_variance) < 0.0:
            raise InputError(f"min_variance must be >= 0, got {min_variance}.")
        counts = self.selected_counts
        too_few = [c for c, n in enumerate(counts) if n < 2]
        if too_few:
            listing = ", ".join(f"class {c} ({counts[c]} voxel{'s' if counts[c] != 1 else ''})"
                                for c in too_few)
            raise InputError(f"Too few confidently and correctly predicted voxels to fit a "
                             f"Gaussian for {listing}; each class needs at least 2. Lower rho "
                             f"(now {self.rho}), add source cases that contain the class, or "
                             "train the source model longer.")
        d = self.embedding_dim
        means, covariances = [], []
        identity = torch.eye(d, dtype=torch.float64)
        for reservoir in self._reservoirs:
            x = torch.from_numpy(reservoir.rows()).to(torch.float64)
            mean = x.mean(dim=0)
            centred = x - mean
            sample_cov = centred.T @ centred / (x.shape[0] - 1)
            sample_cov = 0.5 * (sample_cov + sample_cov.T)
            mean_variance = torch.trace(sample_cov) / d
            covariances.append((1.0 - shrinkage) * sample_cov
                               + (shrinkage * mean_variance + min_variance) * identity)
            means.append(mean)
        total = float(sum(counts))
        prototypes = ClassPrototypes(
            means=torch.stack(means), covariances=torch.stack(covariances),
            weights=torch.tensor([n / total for n in counts], dtype=torch.float64),
            class_indices=tuple(range(self.num_classes)), counts=tuple(counts), rho=self.rho,
            embedding_layer=str(embedding_layer), embedding_dim=d, shrinkage=float(shrinkage))
        try:
            prototypes.validate()
        except CheckpointError as error:
            raise InputError(f"The fitted prototypes are degenerate ({error}). Increase "
                             "shrinkage or min_variance.") from error
        return prototypes


def check_compatible(prototypes: Optional[ClassPrototypes], embedding_dim: int,
                     num_classes: int) -> None:
    """Check that prototypes fit a network with ``embedding_dim`` channels and ``num_classes``.

    Raises:
        CheckpointError: no prototypes, another embedding dimension, classes missing or
            beyond the network's; the message names the mismatch and says to re-run
            ``sfuda fit-prototypes``.
    """
    if prototypes is None:
        raise CheckpointError("This checkpoint has no GMM prototypes, so GMM adaptation cannot "
                              f"run. {REFIT_HINT}")
    if int(prototypes.embedding_dim) != int(embedding_dim):
        raise CheckpointError(
            f"The GMM prototypes were fitted on a {prototypes.embedding_dim}-dimensional "
            f"embedding ('{prototypes.embedding_layer}') but the network's embedding has "
            f"{embedding_dim} channels. {REFIT_HINT}")
    present = {int(c) for c in prototypes.class_indices}
    expected = set(range(int(num_classes)))
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no prototype for class(es) {missing}")
        if extra:
            parts.append(f"prototypes for class(es) {extra} that the {num_classes}-class "
                         "network does not have")
        raise CheckpointError(f"The GMM prototypes do not match the network: "
                              f"{'; '.join(parts)}. {REFIT_HINT}")
