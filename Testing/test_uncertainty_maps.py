"""The candidate uncertainty maps: disagreement, candidate spread, flip TTA, temperature scaling
(fit, storage in the checkpoint, application), the Mahalanobis distance to the class Gaussians,
and their computation for a method's result (``add_uncertainty_maps``, HEAL's option)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import GMMConfig, HEALConfig, InferenceConfig, InputSpec
from SFUDASegmentLib.data.geometry import Volume
from SFUDASegmentLib.errors import CheckpointError, InputError
from SFUDASegmentLib.gmm.adaptation import adapted_checkpoint, gmm_adapt
from SFUDASegmentLib.gmm.prototypes import ClassPrototypes
from SFUDASegmentLib.heal.pipeline import heal_adapt
from SFUDASegmentLib.inference.preparation import predict_indices, prepare_input
from SFUDASegmentLib.inference.segment import segment
from SFUDASegmentLib.uncertainty.candidate_spread import candidate_spread, candidate_votes, segment_candidates
from SFUDASegmentLib.uncertainty.disagreement import label_disagreement, probability_disagreement
from SFUDASegmentLib.uncertainty.ensemble import ensemble_entropy
from SFUDASegmentLib.uncertainty.entropy import voxel_entropy
from SFUDASegmentLib.uncertainty.flip_tta import flip_combinations, flip_tta
from SFUDASegmentLib.uncertainty.mahalanobis import mahalanobis_map, nearest_class_distance
from SFUDASegmentLib.uncertainty.maps import add_uncertainty_maps
from SFUDASegmentLib.uncertainty.temperature import apply_temperature, fit_temperature, nll_optimal_temperature
from tiny_models import SignNet, single_thread, tiny_full_model, untrained_checkpoint  # noqa: F401

CPU = InferenceConfig(device="cpu")


# --------------------------------------------------------------------------- disagreement, spread


def test_probability_disagreement_is_the_total_variation_distance():
    source = np.array([[0.7, 1.0, 0.5], [0.2, 0.0, 0.5], [0.1, 0.0, 0.0]], dtype=np.float32)
    adapted = np.array([[0.1, 1.0, 0.0], [0.3, 0.0, 0.0], [0.6, 0.0, 1.0]], dtype=np.float16)
    # |0.6| + |0.1| + |0.5| = 1.2 -> 0.6; identical -> 0; disjoint -> 1
    np.testing.assert_allclose(probability_disagreement(source, adapted), [0.6, 0.0, 1.0], atol=1e-3)
    with pytest.raises(InputError, match="same shape"):
        probability_disagreement(source, adapted[:, :2])


def test_label_disagreement_marks_changed_voxels():
    np.testing.assert_array_equal(label_disagreement(np.array([[0, 1], [2, 2]]), np.array([[0, 2], [2, 0]])),
                                  [[0, 1], [0, 1]])
    with pytest.raises(InputError):
        label_disagreement(np.zeros((2, 2)), np.zeros((2, 3)))


def test_ensemble_entropy_is_the_entropy_of_the_members_mean():
    source = np.array([[0.9, 0.5, 1.0], [0.1, 0.5, 0.0]], dtype=np.float32)
    adapted = np.array([[0.1, 0.5, 1.0], [0.9, 0.5, 0.0]], dtype=np.float16)
    # means 0.5/0.5 -> 1 bit, 0.5/0.5 -> 1 bit, 1/0 -> 0: on voxel 0 each member leans (0.47 bit), they disagree
    np.testing.assert_allclose(ensemble_entropy([source, adapted]), [1.0, 1.0, 0.0], atol=1e-4)
    h = -(0.9 * np.log2(0.9) + 0.1 * np.log2(0.1))
    np.testing.assert_allclose(ensemble_entropy([source])[0], h, atol=1e-5)
    # T = 2: softmax(log(0.9, 0.1) / 2) = (sqrt 0.9, sqrt 0.1) / 1.265 = (0.75, 0.25) -> 0.811 bit; the
    # members' 0.25/0.75 and 0.75/0.25 on voxel 0 still average to 1 bit; a certain voxel (1, 0) stays near 0:
    # the clip of P at 1e-7 becomes sqrt(1e-7) = 3.2e-4 -> 0.0041 bit
    np.testing.assert_allclose(ensemble_entropy([source], 2.0)[0], -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)),
                               atol=1e-4)
    np.testing.assert_allclose(ensemble_entropy([source, adapted], 2.0), [1.0, 1.0, 0.0041], atol=1e-4)
    with pytest.raises(InputError, match="temperature must be positive"):
        ensemble_entropy([source], 0.0)
    with pytest.raises(InputError, match="at least one network"):
        ensemble_entropy([])
    with pytest.raises(InputError, match="share one shape"):
        ensemble_entropy([source, adapted[:, :2]])
    with pytest.raises(InputError, match="probabilities"):
        ensemble_entropy([source, np.array([[3.0, 0.0, 0.0], [0.0, 1.0, 1.0]])])


def test_candidate_votes_and_spread_by_hand():
    segmentations = np.array([[0, 1, 2, 1], [0, 1, 1, 2], [0, 1, 0, 2]])  # 3 candidates, 4 voxels
    np.testing.assert_allclose(candidate_votes(segmentations, 3),
                               [[1, 0, 1 / 3, 0], [0, 1, 1 / 3, 1 / 3], [0, 0, 1 / 3, 2 / 3]], atol=1e-6)
    np.testing.assert_allclose(candidate_spread(segmentations, 3), [0, 0, 2 / 3, 1 / 3], atol=1e-6)
    with pytest.raises(InputError, match="class indices"):
        candidate_spread(segmentations, 2)


@pytest.mark.parametrize("dims", ["2d", "2.5d"])
def test_segment_candidates_segments_the_rendered_slices_and_leaves_the_others_background(dims, rng):
    candidates = rng.normal(size=(2, 1, 4, 6, 6)).astype(np.float32)
    spec = InputSpec(dims=dims, patch_size=(6, 6), context_slices=1)
    # SignNet calls class 1 where its first input channel is > 0: the slice itself in 2D, the
    # slice below (clipped at the edge) in 2.5D, whose stack starts with slice z - 1
    segmentations = segment_candidates(SignNet(), candidates, spec, 2, CPU, torch.device("cpu"), [0, 2])
    below = {"2d": [0, 2], "2.5d": [0, 1]}[dims]
    np.testing.assert_array_equal(segmentations[:, [0, 2]], candidates[:, 0, below] > 0)
    assert not segmentations[:, [1, 3]].any()
    assert not segment_candidates(SignNet(), candidates, spec, 2, CPU, torch.device("cpu"), []).any()


# --------------------------------------------------------------------------- flip TTA


class RampNet(torch.nn.Module):
    """Two-class "network" whose class-1 logit rises along x (not mirror-symmetric) and does not
    depend on y: ``logit_1 = slope * (x - 1)``, ``logit_0 = 0``."""

    def __init__(self, slope: float = 1.0) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.arange(image.shape[-1], dtype=image.dtype).expand_as(image[:, :1])
        return torch.cat([torch.zeros_like(image[:, :1]), self.slope * (x - 1.0)], dim=1)


def test_flip_tta_mean_and_variance_by_hand():
    spec = InputSpec(dims="2d", patch_size=(4, 5))
    image = np.zeros((1, 2, 4, 5), dtype=np.float32)
    out = flip_tta(RampNet(), image, spec, 2, replace(CPU, probabilities_dtype="float32"), torch.device("cpu"))
    assert out.passes == [(), ("y",), ("x",), ("y", "x")]
    p = 1.0 / (1.0 + np.exp(-(np.arange(5) - 1.0)))         # class 1 at column x, no flip
    mirrored = p[::-1]                                         # after an x flip and back
    np.testing.assert_allclose(out.mean[1, 0, 0], (p + mirrored) / 2, atol=1e-6)
    # passes give p, p, p', p' for both classes: variance ((p - p') / 2)^2
    np.testing.assert_allclose(out.variance[0, 2], ((p - mirrored) / 2) ** 2, atol=1e-6)
    np.testing.assert_allclose(out.entropy, voxel_entropy(out.mean), atol=1e-6)


class CountingNet(torch.nn.Module):
    """A 1x1 convolution that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.calls = torch.nn.Conv2d(1, 3, kernel_size=1), 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(image)


def test_flip_tta_reuses_the_unflipped_probabilities_it_is_given():
    spec = InputSpec(dims="2d", patch_size=(8, 8))
    config = replace(CPU, probabilities_dtype="float32", batch_size=8)
    image = np.random.default_rng(1).normal(size=(1, 2, 8, 8)).astype(np.float32)
    net = CountingNet().eval()
    full = flip_tta(net, image, spec, 3, config, torch.device("cpu"))
    calls = net.calls
    _, plain = predict_indices(net, image, spec, 3, config, torch.device("cpu"), True)
    net.calls = 0
    reused = flip_tta(net, image, spec, 3, config, torch.device("cpu"), unflipped=plain)
    assert net.calls == calls * 3 // 4  # three of the four passes run
    np.testing.assert_allclose(reused.mean, full.mean, atol=1e-6)
    np.testing.assert_allclose(reused.variance, full.variance, atol=1e-7)
    with pytest.raises(InputError, match="unflipped probabilities"):
        flip_tta(net, image, spec, 3, config, torch.device("cpu"), unflipped=plain[:2])


def test_flip_tta_of_a_mirror_symmetric_network_has_no_variance():
    spec = InputSpec(dims="2d", patch_size=(8, 8))
    net = torch.nn.Conv2d(1, 3, kernel_size=1)  # voxel-wise: commutes with every flip
    image = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    out = flip_tta(net.eval(), image, spec, 3, replace(CPU, probabilities_dtype="float32"), torch.device("cpu"),
                   axes=("z", "y", "x"))
    assert len(out.passes) == 8
    _, plain = predict_indices(net, image, spec, 3, replace(CPU, probabilities_dtype="float32"), torch.device("cpu"), True)
    np.testing.assert_allclose(out.mean, plain, atol=1e-6)
    assert out.variance.max() < 1e-10
    with pytest.raises(InputError, match="Flip axes"):
        flip_combinations(("x", "x"))


# --------------------------------------------------------------------------- temperature


def test_apply_temperature_equals_softmax_of_scaled_logits(rng):
    logits = torch.from_numpy(rng.normal(0, 3, size=(4, 6, 7)).astype(np.float32))
    probs = torch.softmax(logits, 0).numpy()
    for t in (0.5, 1.0, 2.5):
        expected = torch.softmax(logits / t, 0).numpy()
        scaled = apply_temperature(probs, t)
        np.testing.assert_allclose(scaled, expected, atol=1e-5)
        np.testing.assert_array_equal(scaled.argmax(0), probs.argmax(0))
    with pytest.raises(InputError, match="positive"):
        apply_temperature(probs, 0.0)


def test_nll_optimal_temperature_recovers_the_temperature_of_the_labels(rng):
    logits = rng.normal(0, 4, size=(60_000, 3))
    true_t = 2.5
    p = np.exp(logits / true_t)
    p /= p.sum(1, keepdims=True)
    labels = (rng.random(len(p))[:, None] > np.cumsum(p, 1)).sum(1)  # labels drawn from softmax(z / T)
    t, before, after = nll_optimal_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    assert after < before
    with pytest.raises(InputError, match="class indices"):
        nll_optimal_temperature(logits[:3], np.array([0, 1, 3]))


def test_fit_temperature_stores_t_in_a_new_checkpoint_that_reads_back(tiny_full_model, tmp_path):
    source = tiny_full_model.checkpoint
    fitted, fit = fit_temperature(source, tiny_full_model.train_images[:2], tiny_full_model.train_labels[:2], CPU)
    assert source.temperature is None and "temperature" not in source.provenance  # input untouched
    assert fitted.temperature == fit.temperature and fit.nll_after <= fit.nll_before
    assert fitted.provenance["temperature"]["voxels"] == fit.voxels > 0
    loaded = SourceCheckpoint.load(fitted.save(tmp_path / "t.sfuda"))
    assert loaded.temperature == pytest.approx(fit.temperature)
    assert loaded.describe()["temperature"] == pytest.approx(fit.temperature)
    # a checkpoint written without it (every older file) reads back with None
    assert SourceCheckpoint.load(tiny_full_model.path).temperature is None


def test_a_stored_temperature_that_is_not_positive_is_refused(tiny_full_model, tmp_path):
    path = replace(tiny_full_model.checkpoint, temperature=-1.0).save(tmp_path / "bad.sfuda")
    with pytest.raises(CheckpointError, match="temperature"):
        SourceCheckpoint.load(path)


def test_segment_adds_the_calibrated_entropy_only_when_the_checkpoint_has_a_temperature(tiny_full_model):
    image = tiny_full_model.held_out[0][0]
    plain = segment(tiny_full_model.checkpoint, image, CPU)
    assert sorted(plain.maps) == ["entropy"]  # default outputs unchanged
    scaled = segment(replace(tiny_full_model.checkpoint, temperature=3.0), image, CPU)
    np.testing.assert_array_equal(scaled.labels, plain.labels)
    expected = voxel_entropy(apply_temperature(plain.probabilities, 3.0))
    np.testing.assert_allclose(scaled.maps["calibrated_entropy"], expected, atol=1e-5)
    assert scaled.maps["calibrated_entropy"].mean() > plain.maps["entropy"].mean()  # T > 1 softens


# --------------------------------------------------------------------------- Mahalanobis


def test_nearest_class_distance_matches_the_textbook_formula(rng):
    d, k = 4, 3
    factors = rng.normal(size=(k, d, d))
    covariances = torch.from_numpy(factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(d))
    means = torch.from_numpy(rng.normal(0, 3, size=(k, d)))
    prototypes = ClassPrototypes(means, covariances, torch.full((k,), 1 / k, dtype=torch.float64), (0, 1, 2),
                                 (10, 10, 10), 0.97, "decoder_final", d)
    z = rng.normal(0, 3, size=(50, d))
    expected = np.min([np.sqrt(np.einsum("ni,ij,nj->n", z - means[c].numpy(), np.linalg.inv(covariances[c].numpy()),
                                         z - means[c].numpy())) for c in range(k)], axis=0)
    np.testing.assert_allclose(nearest_class_distance(torch.from_numpy(z), prototypes).numpy(), expected, rtol=1e-5)
    assert float(nearest_class_distance(means.float(), prototypes).max()) < 1e-3  # a class mean: distance 0
    with pytest.raises(InputError, match="Embeddings"):
        nearest_class_distance(torch.zeros(3, d + 1), prototypes)


def _prototypes_for(checkpoint: SourceCheckpoint, rng: np.random.Generator) -> ClassPrototypes:
    d, k = checkpoint.seg_config.channels[0], checkpoint.num_classes
    return ClassPrototypes(torch.from_numpy(rng.normal(size=(k, d))), torch.eye(d, dtype=torch.float64).repeat(k, 1, 1),
                           torch.full((k,), 1 / k, dtype=torch.float64), tuple(range(k)), (5,) * k, 0.97,
                           "decoder_final", d)


@pytest.mark.parametrize("dims, shape", [("2d", (3, 16, 20)), ("3d", (8, 16, 16))])
def test_mahalanobis_map_is_the_distance_of_the_networks_embedding(dims, shape, rng):
    spec = InputSpec(dims=dims, patch_size=shape if dims == "3d" else shape[1:])
    checkpoint = untrained_checkpoint(spec)
    prototypes = _prototypes_for(checkpoint, rng)
    net = checkpoint.build_segmentation_net("cpu")
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    values = mahalanobis_map(net, image, spec, prototypes, torch.device("cpu"), batch_size=2)
    with torch.no_grad():  # whole slices (2D) / the one patch (3D): the embedding of the whole image
        z = net.embed(torch.from_numpy(np.moveaxis(image, 1, 0) if dims == "2d" else image[None]))
    flat = z.movedim(1, -1).reshape(-1, z.shape[1])
    np.testing.assert_allclose(values.ravel(), nearest_class_distance(flat, prototypes).numpy(), rtol=1e-4)


# --------------------------------------------------------------------------- maps of a result


def test_heal_candidate_spread_is_the_spread_of_the_source_segmentations_of_its_candidates(tiny_full_model):
    image = tiny_full_model.held_out[0][0]
    checkpoint = tiny_full_model.checkpoint
    config = HEALConfig(candidates=3, steps=4, candidate_batch=3, stages="heal")
    plain = heal_adapt(image, checkpoint, config, CPU)
    assert "candidate_spread" not in plain.maps  # default unchanged
    result = heal_adapt(image, checkpoint, replace(config, candidate_spread=True), CPU)
    np.testing.assert_array_equal(result.labels, plain.labels)
    net = checkpoint.build_segmentation_net("cpu")
    # the 2D candidates are on the input grid = the network grid; segment each one
    segmentations = np.stack([predict_indices(net, c[None, None], checkpoint.input_spec, 3, CPU,
                                              torch.device("cpu"))[0][0] for c in result.candidates])
    np.testing.assert_allclose(result.maps["candidate_spread"], candidate_spread(segmentations, 3), atol=1e-6)
    with pytest.raises(InputError, match="candidate spread"):
        heal_adapt(image, checkpoint, HEALConfig(stages="hd", candidate_spread=True), CPU)


def test_add_uncertainty_maps_to_no_adaptation_heal_and_gmm(tiny_full_model):
    image = tiny_full_model.held_out[1][0]
    checkpoint = replace(tiny_full_model.checkpoint, temperature=1.5)
    result = segment(checkpoint, image, CPU)
    add_uncertainty_maps(result, image, checkpoint, ["flip_entropy", "flip_variance", "mahalanobis",
                                                     "label_disagreement"], inference=CPU)
    assert {"flip_entropy", "flip_variance", "mahalanobis", "label_disagreement"} <= set(result.maps)
    assert not result.maps["label_disagreement"].any()  # no adaptation: the source's own labels
    assert all(m.shape == result.labels.shape and m.dtype == np.float32 for m in result.maps.values())
    assert "mean_mahalanobis" in result.structure_stats[0]
    heal = heal_adapt(image, checkpoint, HEALConfig(stages="hd"), CPU)
    add_uncertainty_maps(result, image, checkpoint, ["nig_variance"], inference=CPU)
    np.testing.assert_allclose(result.maps["nig_variance"], heal.maps["nig_variance"], atol=1e-6)  # HEAL's own
    add_uncertainty_maps(heal, image, checkpoint, ["label_disagreement"], inference=CPU)
    np.testing.assert_array_equal(heal.maps["label_disagreement"], heal.labels != heal.label_maps["pseudo_labels"])
    results, adaptation = gmm_adapt(image, checkpoint, GMMConfig(iterations=3), CPU)
    adapted = adapted_checkpoint(checkpoint, adaptation, GMMConfig(iterations=3), ["target"])
    gmm = add_uncertainty_maps(results[0], image, checkpoint, ["disagreement", "calibrated_entropy"], adapted, CPU)
    source_probs = segment(checkpoint, image, CPU).probabilities
    np.testing.assert_allclose(gmm.maps["disagreement"], probability_disagreement(source_probs, gmm.probabilities),
                               atol=2e-3)
    # no table entry matches this checkpoint's modality, so the phantom and BraTS entries count together:
    # the ensemble entropy (0.774, 0.923, 0.779, 0.891) beats the NIG variance (0.771, 0.910, 0.735, 0.871) and
    # the disagreement (0.747, 0.871, 0.746, 0.852); the adapted network's own entropy is known to mislead and
    # never recommended
    assert gmm.reliability["method"] == "gmm" and gmm.reliability["map"] == "ensemble_entropy"
    without = replace(results[0], maps={k: v for k, v in results[0].maps.items() if k != "ensemble_entropy"})
    assert add_uncertainty_maps(without, image, checkpoint, [], adapted, CPU).reliability["map"] == "nig_variance"
    # GMM's own NIG variance map is the one add_uncertainty_maps computes from the adapted network
    bare = replace(results[0], maps={k: v for k, v in results[0].maps.items() if k != "nig_variance"})
    again = add_uncertainty_maps(bare, image, checkpoint, ["nig_variance"], adapted, CPU)
    np.testing.assert_allclose(results[0].maps["nig_variance"], again.maps["nig_variance"], atol=2e-3)


def test_gmm_returns_the_ensemble_entropy_of_the_source_and_adapted_networks_over_flips(tiny_full_model):
    image = tiny_full_model.held_out[1][0]
    checkpoint = replace(tiny_full_model.checkpoint, temperature=2.0)  # each member is tempered before the mean
    config = GMMConfig(iterations=3)
    results, adaptation = gmm_adapt(image, checkpoint, config, CPU)
    gmm = results[0]
    adapted = adapted_checkpoint(checkpoint, adaptation, config, ["target"])
    prepared = prepare_input(image, checkpoint.input_spec)
    means = [flip_tta(c.build_segmentation_net(torch.device("cpu")), prepared.image, checkpoint.input_spec, 3,
                      replace(CPU, probabilities_dtype="float32"), torch.device("cpu")).mean
             for c in (checkpoint, adapted)]
    tempered = [apply_temperature(m, 2.0) for m in means]
    expected = prepared.to_input_grid(voxel_entropy((tempered[0] + tempered[1]) / 2), is_label=False)
    untempered = prepared.to_input_grid(voxel_entropy((means[0] + means[1]) / 2), is_label=False)
    assert not np.allclose(expected, untempered, atol=5e-3)
    np.testing.assert_allclose(gmm.maps["ensemble_entropy"], expected, atol=5e-3)
    assert not np.allclose(gmm.maps["ensemble_entropy"], gmm.maps["entropy"], atol=5e-3)  # not the adapted one's
    assert gmm.timings["seconds"]["flip_uncertainty"] > 0
    assert "mean_ensemble_entropy" in gmm.structure_stats[0]
    # the same map when asked for afterwards; switched off, not computed
    again = add_uncertainty_maps(replace(gmm, maps={}), image, checkpoint, ["ensemble_entropy"], adapted, CPU)
    np.testing.assert_allclose(again.maps["ensemble_entropy"], gmm.maps["ensemble_entropy"], atol=5e-3)
    quick = gmm_adapt(image, checkpoint, replace(config, flip_uncertainty=False), CPU)[0][0]
    assert "ensemble_entropy" not in quick.maps and "flip_uncertainty" not in quick.timings["seconds"]
    np.testing.assert_array_equal(quick.labels, gmm.labels)


def test_add_uncertainty_maps_errors(tiny_full_model):
    image = tiny_full_model.held_out[1][0]
    checkpoint = tiny_full_model.checkpoint
    result = segment(checkpoint, image, CPU)
    with pytest.raises(InputError, match="Unknown uncertainty map"):
        add_uncertainty_maps(result, image, checkpoint, ["entropy_of_something"], inference=CPU)
    with pytest.raises(CheckpointError, match="fit-temperature"):
        add_uncertainty_maps(result, image, checkpoint, ["calibrated_entropy"], inference=CPU)
    for name in ("disagreement", "ensemble_entropy"):
        with pytest.raises(InputError, match="adapted checkpoint"):
            add_uncertainty_maps(result, image, checkpoint, [name], inference=CPU)
    with pytest.raises(CheckpointError, match="prototypes"):
        add_uncertainty_maps(result, image, replace(checkpoint, prototypes=None), ["mahalanobis"], inference=CPU)
    other = Volume(np.pad(image.array, 2), image.geometry)
    with pytest.raises(InputError, match="grid"):
        add_uncertainty_maps(result, other, checkpoint, ["flip_entropy"], inference=CPU)
