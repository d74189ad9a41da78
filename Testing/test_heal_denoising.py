"""HEAL hierarchical denoising checked against the equations, computed by hand with loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from SFUDASegmentLib.config import HEALConfig
from SFUDASegmentLib.errors import InputError
from SFUDASegmentLib.heal.denoising import (
    DenoiseResult, entropy_refine, hierarchical_denoise, minmax_normalize, neighbourhood_size,
    nig_parameters, nig_refine, nig_variance, pseudo_labels, regional_entropy, regional_entropy_ceiling)
from SFUDASegmentLib.uncertainty.entropy import voxel_entropy
from SFUDASegmentLib.utils.progress import ProgressReporter

# --------------------------------------------------------------------------------------------
# Independent reference: the paper's equations written voxel by voxel.


def ref_entropy(p: np.ndarray, base: float = 2.0) -> float:
    """-sum_c p_c log_base p_c with p clipped at 1e-7 (one voxel)."""
    return -sum(max(q, 1e-7) * math.log(max(q, 1e-7)) for q in p) / math.log(base)


def window(index: tuple[int, ...], shape: tuple[int, ...], size: tuple[int, ...]):
    """Indices of the window around ``index``, out-of-range positions clamped to the edge."""
    ranges = []
    for i, n, s in zip(index, shape, size):
        r = s // 2
        ranges.append([min(max(j, 0), n - 1) for j in range(i - r, i + r + 1)])
    return list(itertools.product(*ranges))


def ref_mean_regional(h: np.ndarray, size=None) -> np.ndarray:
    size = size or (3,) * h.ndim
    out = np.zeros(h.shape)
    for idx in np.ndindex(h.shape):
        vals = [h[w] for w in window(idx, h.shape, size)]
        out[idx] = sum(vals) / len(vals)
    return out


def ref_histogram_regional(labels: np.ndarray, k: int) -> np.ndarray:
    """The public code's histogram entropy (without its 1e-6 smoothing), via np.histogram."""
    out = np.zeros(labels.shape)
    edges = np.linspace(0, 1, 11)
    for idx in np.ndindex(labels.shape):
        vals = [labels[w] / (k - 1) for w in window(idx, labels.shape, (3,) * labels.ndim)]
        counts = np.histogram(vals, bins=edges)[0]
        q = counts[counts > 0] / len(vals)
        out[idx] = -sum(x * math.log2(x) for x in q)
    return out


def ref_pipeline(probs: np.ndarray, cfg: HEALConfig, base: str = "entropy") -> dict:
    """Every stage of HEAL denoising, one voxel at a time."""
    spatial = probs.shape[1:]
    k = probs.shape[0]
    yt = np.zeros(spatial, int)
    h = np.zeros(spatial)
    for idx in np.ndindex(spatial):
        p = [float(probs[(c, *idx)]) for c in range(k)]
        yt[idx] = p.index(max(p))
        h[idx] = ref_entropy(p, cfg.entropy_base)
    yent = np.where(h > cfg.tau1, 0, yt)
    if cfg.regional_entropy == "mean":
        e = ref_mean_regional(h)
    else:
        e = ref_histogram_regional(yent, k)
    if cfg.normalize_regional:  # largest possible E: log_base K (mean), log2 min(K, 10) bins
        e = e / (math.log(k, cfg.entropy_base) if cfg.regional_entropy == "mean" else math.log2(min(k, 10)))
    alpha = np.zeros(spatial)
    beta = np.zeros(spatial)
    omega = np.zeros(spatial)
    var = np.zeros(spatial)
    for idx in np.ndindex(spatial):
        alpha[idx] = max(cfg.kappa * abs(yt[idx] - yent[idx]) + cfg.eps, cfg.alpha_floor)
        beta[idx] = cfg.zeta1 * (1 - e[idx]) + cfg.zeta2
        omega[idx] = 1 / (cfg.eta1 * e[idx] + cfg.eta2)
        var[idx] = beta[idx] / (omega[idx] * (alpha[idx] - 1))
    norm = (var - var.min()) / (var.max() - var.min())
    keep_from = yent if base == "entropy" else yt
    refined = np.where(norm <= cfg.tau2, keep_from, 0)
    return dict(pseudo=yt, entropy=h, y_ent=yent, regional=e, alpha=alpha, beta=beta,
                omega=omega, variance=var, variance_normalized=norm, refined=refined)


def assert_matches(result: DenoiseResult, ref: dict) -> None:
    for name in ("pseudo", "y_ent", "refined"):
        np.testing.assert_array_equal(getattr(result, name), ref[name], err_msg=name)
    for name in ("entropy", "regional", "alpha", "beta", "omega", "variance_normalized"):
        np.testing.assert_allclose(getattr(result, name), ref[name], rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    # The variance is built from float32 H and E: compare relative to its largest magnitude.
    scale = np.abs(ref["variance"]).max()
    np.testing.assert_allclose(result.variance, ref["variance"], rtol=1e-6, atol=1e-6 * scale,
                               err_msg="variance")


# --------------------------------------------------------------------------------------------
# 2D, two classes, 3x3

P1_2D = np.array([[0.99, 0.97, 0.5],
                  [0.02, 0.9, 0.999],
                  [0.001, 0.6, 0.96]])
PROBS_2D = np.stack([1 - P1_2D, P1_2D])


def test_2d_two_class_every_stage_by_hand():
    cfg = HEALConfig()
    result = hierarchical_denoise(PROBS_2D, cfg)
    ref = ref_pipeline(PROBS_2D, cfg)
    assert_matches(result, ref)
    # Written out: the 50/50 voxel goes to background (argmax tie -> lower index).
    np.testing.assert_array_equal(result.pseudo, [[1, 1, 0], [0, 1, 1], [0, 1, 1]])
    # H: 0.0808 0.1944 1.0 / 0.1414 0.469 0.0114 / 0.0114 0.971 0.2423 (bits): > 0.2 removed.
    np.testing.assert_allclose(result.entropy[0, 2], 1.0, atol=1e-6)
    np.testing.assert_allclose(result.entropy[1, 1], -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1)),
                               atol=1e-6)
    np.testing.assert_array_equal(result.y_ent, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    # Corner window (edge-replicated): rows 0,0,1 x cols 0,0,1.
    h = ref["entropy"]
    corner = (4 * h[0, 0] + 2 * h[0, 1] + 2 * h[1, 0] + h[1, 1]) / 9
    np.testing.assert_allclose(result.regional[0, 0], corner, atol=1e-6)
    np.testing.assert_allclose(result.regional[1, 1], h.mean(), atol=1e-6)
    # kappa 0.1: alpha is held at the floor 1.01 everywhere.
    np.testing.assert_allclose(result.alpha, 1.01, atol=1e-7)
    assert result.variance_normalized.min() == 0.0 and result.variance_normalized.max() == 1.0
    np.testing.assert_array_equal(result.refined, [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert result.window == (3, 3)
    assert result.refined.dtype == np.uint8


def test_2d_alpha_from_label_difference_and_refinement_base():
    cfg = HEALConfig(kappa=2.0)
    hierarchical = hierarchical_denoise(PROBS_2D, cfg)
    literal = hierarchical_denoise(PROBS_2D, cfg, refine_base="pseudo")
    assert_matches(hierarchical, ref_pipeline(PROBS_2D, cfg, "entropy"))
    assert_matches(literal, ref_pipeline(PROBS_2D, cfg, "pseudo"))
    # |Y_T - Y_ent| = 1 where the entropy stage removed class 1: alpha = 2 * 1 + 1e-3.
    np.testing.assert_allclose(hierarchical.alpha,
                               [[1.01, 1.01, 1.01], [1.01, 2.001, 1.01], [1.01, 2.001, 2.001]],
                               atol=1e-6)
    # Those voxels have a low variance: the code's rule brings them back, ours keeps them out.
    np.testing.assert_array_equal(literal.refined, [[0, 0, 0], [0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(hierarchical.refined, np.zeros((3, 3)))


# --------------------------------------------------------------------------------------------
# 3D, three classes, 2x3x3

TRIPLES_3D = [
    (0.98, 0.01, 0.01), (0.90, 0.05, 0.05), (0.40, 0.30, 0.30),
    (0.05, 0.93, 0.02), (0.10, 0.85, 0.05), (0.20, 0.20, 0.60),
    (0.001, 0.001, 0.998), (0.05, 0.05, 0.90), (0.34, 0.33, 0.33),
    (0.60, 0.35, 0.05), (0.02, 0.97, 0.01), (0.25, 0.50, 0.25),
    (0.01, 0.01, 0.98), (0.99, 0.005, 0.005), (0.30, 0.10, 0.60),
    (0.05, 0.90, 0.05), (0.45, 0.10, 0.45), (0.0, 0.0, 1.0),
]
PROBS_3D = np.array(TRIPLES_3D).T.reshape(3, 2, 3, 3)


@pytest.mark.parametrize("mode", ["mean", "histogram"])
def test_3d_three_class_every_stage_by_hand(mode):
    cfg = HEALConfig(regional_entropy=mode)
    result = hierarchical_denoise(PROBS_3D, cfg)
    ref = ref_pipeline(PROBS_3D, cfg)
    assert_matches(result, ref)
    assert result.window == (3, 3, 3)
    # Voxel (0,0,0): p = (0.98, 0.01, 0.01).
    h000 = -(0.98 * math.log2(0.98) + 2 * 0.01 * math.log2(0.01))
    np.testing.assert_allclose(result.entropy[0, 0, 0], h000, atol=1e-6)
    # The 0.45/0.10/0.45 tie goes to class 0; the one-hot (0, 0, 1) voxel is class 2, certain.
    assert result.pseudo[1, 2, 1] == 0 and result.pseudo[1, 2, 2] == 2
    assert result.y_ent[1, 2, 2] == 2


def test_histogram_mode_hand_example_binary():
    labels = np.array([[1, 0, 0],
                       [1, 1, 0],
                       [0, 0, 0]])

    def h2(q):
        return -(q * math.log2(q) + (1 - q) * math.log2(1 - q))

    e = regional_entropy(None, mode="histogram", labels=labels, num_classes=2)
    # Centre: 3 ones, 6 zeros.  Corner (0,0) window (edge-replicated) rows 0,0,1 x cols 0,0,1:
    # 1,1,0 / 1,1,0 / 1,1,1 -> 7 ones.  Corner (2,2): rows 1,2,2 x cols 1,2,2 -> 1 one.
    np.testing.assert_allclose(e[1, 1], h2(3 / 9), atol=1e-6)
    np.testing.assert_allclose(e[0, 0], h2(7 / 9), atol=1e-6)
    np.testing.assert_allclose(e[2, 2], h2(1 / 9), atol=1e-6)
    np.testing.assert_allclose(e, ref_histogram_regional(labels, 2), atol=1e-6)
    # A uniform window has entropy 0.
    assert regional_entropy(None, "histogram", np.zeros((4, 4), int), 2).max() == 0.0


def test_histogram_mode_multiclass_normalisation():
    labels = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    e = regional_entropy(None, "histogram", labels=labels, num_classes=3)
    np.testing.assert_allclose(e[1, 1], math.log2(3), atol=1e-6)  # 3 classes, 3 each
    np.testing.assert_allclose(e, ref_histogram_regional(labels, 3), atol=1e-6)
    # K = 12: values k / 11; classes 0 and 1 (0 and 0.0909) share the first bin -> E = 0.
    two = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    assert regional_entropy(None, "histogram", two, num_classes=12).max() == 0.0
    np.testing.assert_allclose(regional_entropy(None, "histogram", two, num_classes=3)[1, 1],
                               -(5 / 9 * math.log2(5 / 9) + 4 / 9 * math.log2(4 / 9)), atol=1e-6)
    with pytest.raises(InputError, match="class indices"):
        regional_entropy(None, "histogram", labels=labels, num_classes=2)


def test_mean_mode_3d_by_hand(rng):
    h = rng.random((3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(regional_entropy(h), ref_mean_regional(h), atol=1e-6)


def test_log_base_relation():
    h2 = voxel_entropy(PROBS_3D, base=2.0)
    he = voxel_entropy(PROBS_3D, base=math.e)
    np.testing.assert_allclose(he, h2 * math.log(2), rtol=1e-6)
    # The maximum for 3 classes is log 3 (uniform distribution).
    uniform = np.full((3, 1, 1), 1 / 3)
    np.testing.assert_allclose(voxel_entropy(uniform, base=math.e), math.log(3), rtol=1e-6)


def test_float16_input_and_chunking(rng):
    logits = rng.normal(size=(4, 6, 5, 7))
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float16)
    h16 = voxel_entropy(probs)
    assert h16.dtype == np.float32
    h32 = voxel_entropy(probs.astype(np.float32))
    np.testing.assert_array_equal(h16, h32)
    chunked = voxel_entropy(probs, chunk_elements=4 * 5 * 7)  # one z-row at a time
    np.testing.assert_array_equal(chunked, h16)
    np.testing.assert_array_equal(pseudo_labels(probs, chunk_elements=1), np.argmax(probs, 0))
    result = hierarchical_denoise(probs, HEALConfig())
    assert result.refined.shape == (6, 5, 7)
    assert_matches(result, ref_pipeline(probs.astype(np.float32), HEALConfig()))


def test_inputs_are_never_modified(rng):
    probs = PROBS_3D.copy()
    hierarchical_denoise(probs, HEALConfig(regional_entropy="histogram"))
    hierarchical_denoise(probs, HEALConfig())
    np.testing.assert_array_equal(probs, PROBS_3D)
    pseudo = np.array([[1, 2], [0, 1]], np.uint8)
    entropy = np.array([[0.1, 0.5], [0.3, 0.0]], np.float32)
    keep_p, keep_e = pseudo.copy(), entropy.copy()
    y_ent = entropy_refine(pseudo, entropy, 0.2)
    np.testing.assert_array_equal(y_ent, [[1, 0], [0, 1]])
    regional_entropy(entropy)
    nig_refine(pseudo, y_ent, entropy, 0.2)
    np.testing.assert_array_equal(pseudo, keep_p)
    np.testing.assert_array_equal(entropy, keep_e)


def test_nig_variance_and_normalisation_by_hand():
    alpha = np.array([2.0, 1.5, 3.0])
    beta = np.array([1.0, 0.5, 0.2])
    omega = np.array([4.0, 2.0, 0.5])
    # beta / (omega (alpha - 1)): 1/4, 0.5/1, 0.2/1
    var = nig_variance(alpha, beta, omega)
    np.testing.assert_allclose(var, [0.25, 0.5, 0.2], rtol=1e-7)
    np.testing.assert_allclose(minmax_normalize(var), [1 / 6, 1.0, 0.0], atol=1e-7)
    np.testing.assert_array_equal(minmax_normalize(np.full((2, 3), 7.5)), np.zeros((2, 3)))
    with pytest.raises(InputError, match="alpha > 1"):
        nig_variance(np.array([1.0]), np.array([1.0]), np.array([1.0]))


def test_nig_parameters_by_hand():
    cfg = HEALConfig(kappa=0.7, alpha_floor=1.05)
    pseudo = np.array([[2, 1], [0, 2]], np.uint8)
    y_ent = np.array([[0, 1], [0, 2]], np.uint8)  # uint8: |Y_T - Y_ent| must not wrap around
    e = np.array([[0.0, 0.5], [1.0, 0.25]])
    alpha, beta, omega = nig_parameters(pseudo, y_ent, e, cfg)
    np.testing.assert_allclose(alpha, [[0.7 * 2 + 1e-3, 1.05], [1.05, 1.05]], atol=1e-7)
    np.testing.assert_allclose(beta, [[0.81, 0.41], [0.01, 0.61]], atol=1e-7)
    np.testing.assert_allclose(omega, [[100.0, 1 / 0.26], [1 / 0.51, 1 / 0.135]], rtol=1e-6)
    with pytest.raises(InputError, match="alpha_floor"):
        nig_parameters(pseudo, y_ent, e, HEALConfig(alpha_floor=1.0))


def test_regional_entropy_ceiling_by_hand():
    assert regional_entropy_ceiling("mean", 2) == 1.0  # binary tasks: E unchanged
    assert regional_entropy_ceiling("histogram", 2) == 1.0
    np.testing.assert_allclose(regional_entropy_ceiling("mean", 4), 2.0)
    np.testing.assert_allclose(regional_entropy_ceiling("mean", 4, math.e), math.log(4))
    np.testing.assert_allclose(regional_entropy_ceiling("histogram", 30), math.log2(10))
    with pytest.raises(InputError, match="mode"):
        regional_entropy_ceiling("median", 3)


def test_normalised_regional_entropy_keeps_confident_voxels_of_a_four_class_map():
    """A 4-class map with a maximally uncertain patch (E = 2 bits there): unnormalised, beta and
    the variance turn negative in that patch, the min-max normalisation lifts every confident
    voxel above tau2 and Y* loses the confident structures; normalised, they stay."""
    probs = np.zeros((4, 12, 12))
    probs[0] = 1.0
    probs[:, :, 6:] = 0.0
    probs[1, :, 6:] = 1.0                # confident class 1 on the right half
    probs[:, 4:8, 0:3] = 0.25            # uniform over the 4 classes: H = 2 bits
    probs[:, 0:2, 3:9] = [[[0.5]], [[0.5]], [[0.0]], [[0.0]]]  # H = 1 bit: E peaks near 0.5
    probs = (probs * 0.999 + 0.001 / 4)
    raw = hierarchical_denoise(probs, HEALConfig(normalize_regional=False))
    normalised = hierarchical_denoise(probs, HEALConfig())
    assert raw.variance.min() < 0 and normalised.variance.min() > 0
    interior = (slice(8, 12), slice(9, 12))  # confident class 1, far from every uncertain voxel
    assert np.all(raw.refined[interior] == 0)
    assert np.all(normalised.refined[interior] == 1)
    assert normalised.regional.max() <= 1.0 + 1e-6


def test_anisotropic_spacing_uses_in_slice_window():
    assert neighbourhood_size(3, None) == (3, 3, 3)
    assert neighbourhood_size(3, (5.0, 0.8, 0.8)) == (1, 3, 3)
    assert neighbourhood_size(3, (2.0, 1.0, 1.0)) == (3, 3, 3)
    result = hierarchical_denoise(PROBS_3D, HEALConfig(), spacing=(6.0, 1.0, 1.0))
    assert result.window == (1, 3, 3)
    per_slice = np.stack([ref_mean_regional(s) for s in result.entropy]) / math.log2(3)
    np.testing.assert_allclose(result.regional, per_slice, atol=1e-6)
    with pytest.raises(InputError, match="Spacing"):
        hierarchical_denoise(PROBS_3D, HEALConfig(), spacing=(1.0, 1.0))


def test_bad_inputs_are_rejected_with_a_fix():
    with pytest.raises(InputError, match="stack"):
        hierarchical_denoise(np.ones((1, 4, 4)), HEALConfig())
    with pytest.raises(InputError, match="softmax"):
        voxel_entropy(np.array([[[2.0, -1.0]], [[0.5, 3.0]]]))
    nan = PROBS_2D.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        voxel_entropy(nan)
    with pytest.raises(InputError, match="regional entropy mode"):
        hierarchical_denoise(PROBS_2D, HEALConfig(regional_entropy="median"))
    with pytest.raises(InputError, match="refinement base"):
        hierarchical_denoise(PROBS_2D, HEALConfig(), refine_base="labels")
    with pytest.raises(InputError, match="same shape"):
        entropy_refine(np.zeros((2, 2), int), np.zeros((2, 3)), 0.2)
    with pytest.raises(InputError, match=r"\(C, y, x\)"):
        hierarchical_denoise(np.full((2, 4), 0.5), HEALConfig())


def test_progress_is_reported():
    events = []
    hierarchical_denoise(PROBS_2D, HEALConfig(), progress=ProgressReporter(events.append))
    assert [e.stage for e in events] == ["denoising"] * 4
    assert events[0].fraction == 0.0 and events[-1].fraction == 1.0
