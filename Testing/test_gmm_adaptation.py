"""GMM-adapted inference end to end on the tiny full model: prototype fitting into a checkpoint,
adaptation (SWD falls, determinism, NaN stop and restore, class proportions never from ground
truth), the adapted checkpoint, the embedding PCA and its plot, and bad input.

The units (sliced Wasserstein distance, prototype statistics) have their own tests.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from SFUDASegmentLib.checkpoint import SourceCheckpoint
from SFUDASegmentLib.config import GMMConfig, InferenceConfig
from SFUDASegmentLib.errors import CheckpointError, InputError
from SFUDASegmentLib.gmm import adaptation
from SFUDASegmentLib.gmm.adaptation import adapt_model, adapted_checkpoint, embedding_pca, floored_proportions, gmm_adapt
from SFUDASegmentLib.gmm.fitting import fit_prototypes
from SFUDASegmentLib.gmm.plots import render_embedding_plot, write_embedding_plot
from SFUDASegmentLib.gmm.prototypes import ClassPrototypes
from SFUDASegmentLib.inference.preparation import prepare_input
from tiny_models import single_thread, tiny_full_model  # noqa: F401

CPU = InferenceConfig(device="cpu")
FAST = GMMConfig(iterations=6, lr=1e-3, batch_voxels=512, prototype_samples=512, projections=50)
"""A few cheap iterations (the paper's learning rate is too small to see anything in six)."""


def network_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def source_probabilities(checkpoint: SourceCheckpoint, image) -> list[np.ndarray]:
    """``(K, Y, X)`` float32 softmax of the frozen source model on each 2D image, computed
    directly (independent of the library's inference code)."""
    net = checkpoint.build_segmentation_net("cpu")
    out = []
    with torch.no_grad():
        for volume in image:
            prepared = prepare_input(volume, checkpoint.input_spec)
            logits = net(torch.from_numpy(prepared.image[:, 0])[None])
            out.append(torch.softmax(logits.float(), 1)[0].numpy())
    return out


# --------------------------------------------------------------------------- fitting


def test_fit_prototypes_means_and_counts_equal_a_direct_computation(tiny_full_model, tmp_path):
    checkpoint = replace(tiny_full_model.checkpoint, prototypes=None)
    images, labels = tiny_full_model.train_images[:2], tiny_full_model.train_labels[:2]
    fitted = fit_prototypes(checkpoint, images, labels, GMMConfig(rho=0.6, max_samples_per_class=10**6),
                            device="cpu", batch_size=1)
    assert checkpoint.prototypes is None  # the input object is not modified
    prototypes = ClassPrototypes.from_state(fitted.prototypes)
    net = checkpoint.build_segmentation_net("cpu")
    selected: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    with torch.no_grad():
        for image, label in zip(images, labels):
            x = torch.from_numpy(prepare_input(image, checkpoint.input_spec).image[:, 0])[None]
            logits, z = net(x, return_embedding=True)
            probs = torch.softmax(logits, 1)[0].numpy()
            emb = z[0].numpy()
            keep = (probs.argmax(0) == label.array) & (probs.max(0) > 0.6)
            for c in selected:
                selected[c].append(emb[:, keep & (label.array == c)].T)
    rows = {c: np.concatenate(v) for c, v in selected.items()}
    assert prototypes.class_indices == (0, 1, 2)
    assert list(prototypes.counts) == [len(rows[c]) for c in (0, 1, 2)]
    # the source class priors count every labelled voxel, confident or not
    label_counts = np.bincount(np.concatenate([l.array.ravel() for l in labels]), minlength=3)
    assert list(prototypes.label_counts) == label_counts.tolist()
    np.testing.assert_allclose(prototypes.label_shares, label_counts / label_counts.sum(), rtol=1e-12)
    total = sum(len(r) for r in rows.values())
    np.testing.assert_allclose(prototypes.weights.numpy(), [len(rows[c]) / total for c in (0, 1, 2)], rtol=1e-12)
    for c in (0, 1, 2):
        np.testing.assert_allclose(prototypes.means[c].numpy(), rows[c].mean(0), rtol=1e-4, atol=1e-5)
    assert prototypes.embedding_dim == net.embedding_dim and prototypes.rho == 0.6
    assert fitted.provenance["prototypes"]["rho"] == 0.6 and fitted.provenance["prototypes"]["cases"] == 2

    loaded = SourceCheckpoint.load(fitted.save(tmp_path / "fitted.sfuda"))
    again = ClassPrototypes.from_state(loaded.prototypes)
    for name in ("means", "covariances", "weights"):
        assert torch.equal(getattr(again, name), getattr(prototypes, name))
    card = loaded.describe()
    assert card["prototypes"]["num_classes"] == 3 and card["prototypes"]["rho"] == 0.6
    assert [c["selected_voxels"] for c in card["prototypes"]["classes"]] == list(prototypes.counts)
    assert card["methods"] == ["none", "heal", "gmm"]


def test_classes_without_confident_voxels_fall_back_to_all_labelled_voxels(tiny_full_model):
    """rho just below 1 leaves (almost) no confident voxel: those classes use every labelled voxel."""
    checkpoint = replace(tiny_full_model.checkpoint, prototypes=None)
    images, labels = tiny_full_model.train_images[:1], tiny_full_model.train_labels[:1]
    fitted = fit_prototypes(checkpoint, images, labels, GMMConfig(rho=1.0 - 1e-9, max_samples_per_class=10**6),
                            device="cpu", batch_size=1)
    fallback = fitted.provenance["prototypes"]["fallback_classes"]
    assert fallback, "rho ~ 1 must leave some class without confident voxels"
    prototypes = ClassPrototypes.from_state(fitted.prototypes)
    net = checkpoint.build_segmentation_net("cpu")
    x = torch.from_numpy(prepare_input(images[0], checkpoint.input_spec).image[:, 0])[None]
    with torch.no_grad():
        z = net.embed(x)[0].numpy()
    for c in fallback:
        members = z[:, labels[0].array == c].T
        assert prototypes.counts[c] == len(members)
        np.testing.assert_allclose(prototypes.means[c].numpy(), members.mean(0), rtol=1e-4, atol=1e-5)
    assert abs(float(prototypes.weights.sum()) - 1.0) < 1e-12


def test_checkpoint_without_prototypes_names_fit_prototypes(tiny_full_model):
    bare = replace(tiny_full_model.checkpoint, prototypes=None)
    with pytest.raises(CheckpointError, match="sfuda fit-prototypes"):
        gmm_adapt(tiny_full_model.held_out[0][0], bare, FAST, CPU)
    assert "gmm" not in bare.describe()["methods"]


def _prototypes(dim: int, classes: tuple[int, ...]) -> dict:
    k = len(classes)
    return ClassPrototypes(torch.zeros(k, dim, dtype=torch.float64),
                           torch.eye(dim, dtype=torch.float64).repeat(k, 1, 1),
                           torch.full((k,), 1.0 / k, dtype=torch.float64), classes, (10,) * k,
                           0.97, "decoder_final", dim).to_state()


@pytest.mark.parametrize("dim, classes, words", [
    (4, (0, 1, 2), ["4-dimensional", "8 channels", "fit-prototypes"]),
    (8, (0, 1), ["no prototype for class(es) [2]", "fit-prototypes"]),
])
def test_prototypes_that_do_not_fit_the_network(tiny_full_model, tmp_path, dim, classes, words):
    wrong = replace(tiny_full_model.checkpoint, prototypes=_prototypes(dim, classes))
    with pytest.raises(CheckpointError) as error:
        gmm_adapt(tiny_full_model.held_out[0][0], wrong, FAST, CPU)
    for word in words:
        assert word in str(error.value)
    path = wrong.save(tmp_path / "wrong.sfuda")
    with pytest.raises(CheckpointError, match=words[0].replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        SourceCheckpoint.load(path)


@pytest.mark.parametrize("change, words", [
    ({"iterations": 0}, ["at least 1 iteration", "got 0"]),
    ({"iterations": -3}, ["got -3"]),
    ({"class_proportions": "truth"}, ["class_proportions", "truth"]),
    ({"lr": 0.0}, ["learning rate"]),
    ({"min_class_share": 0.5}, ["min_class_share", "0.5"]),
])
def test_bad_settings_are_input_errors(tiny_full_model, change, words):
    with pytest.raises(InputError) as error:
        gmm_adapt(tiny_full_model.held_out[0][0], tiny_full_model.checkpoint, replace(FAST, **change), CPU)
    for word in words:
        assert word in str(error.value)


# --------------------------------------------------------------------------- adaptation


def test_floored_proportions_by_hand():
    # glioma-like source priors: tumour classes are ~1e-4 of the confident voxels
    shares = [0.9991, 0.0004, 0.0004, 0.0001]
    total = 0.9991 + 3 * 0.01
    np.testing.assert_allclose(floored_proportions(shares, 0.01), [0.9991 / total] + [0.01 / total] * 3,
                               rtol=1e-12)
    assert floored_proportions([0.5, 0.25, 0.25], 0.01) == [0.5, 0.25, 0.25]
    assert floored_proportions([1.0, 0.0], 0.0) == [1.0, 0.0]


def test_adaptation_lowers_the_swd_to_the_prototypes(tiny_full_model):
    image = tiny_full_model.held_out[0][0]
    config = GMMConfig(iterations=30, lr=1e-3, batch_voxels=1024, prototype_samples=1024, seed=1)
    (result,), record = gmm_adapt(image, tiny_full_model.checkpoint, config, CPU)
    assert record.swd_after < 0.6 * record.swd_before
    assert len(record.loss_curve) == 30 and np.mean(record.loss_curve[-5:]) < np.mean(record.loss_curve[:5])
    assert record.stopped_early is None and result.extra["stopped_early"] is None
    assert result.extra["swd_before"] == record.swd_before and result.extra["swd_after"] == record.swd_after
    assert result.method == "gmm" and result.labels.shape == image.array.shape
    assert result.geometry.matches(image.geometry)
    assert result.maps["entropy"].shape == image.array.shape
    assert result.timings["seconds_per_iteration"] > 0
    assert set(result.timings["seconds"]) == {"preprocess", "adaptation", "inference", "postprocess", "flip_uncertainty"}


def test_same_seed_same_weights_other_seed_differs(tiny_full_model):
    targets = [prepare_input(tiny_full_model.held_out[0][0], tiny_full_model.checkpoint.input_spec)]
    first = adapt_model(tiny_full_model.checkpoint, targets, FAST, torch.device("cpu"))
    again = adapt_model(tiny_full_model.checkpoint, targets, FAST, torch.device("cpu"))
    other = adapt_model(tiny_full_model.checkpoint, targets, replace(FAST, seed=5), torch.device("cpu"))
    assert first.loss_curve == again.loss_curve and first.swd_after == again.swd_after
    assert network_states_equal(first.model.state_dict(), again.model.state_dict())
    assert first.loss_curve != other.loss_curve
    assert not network_states_equal(first.model.state_dict(), other.model.state_dict())
    assert not network_states_equal(first.model.state_dict(), tiny_full_model.checkpoint.seg_state)


def _poison_swd(monkeypatch: pytest.MonkeyPatch, at_call: int, kind: str) -> None:
    """From the ``at_call``-th training SWD on (1-based), return NaN (``kind="value"``) or a
    finite value with a NaN gradient (``kind="gradient"``). Evaluation calls pass through."""
    original = adaptation.sliced_wasserstein
    calls = [0]

    def swd(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
        value = original(a, b, **kwargs)
        if "directions" in kwargs:  # the fixed before/after evaluation
            return value
        calls[0] += 1
        if calls[0] < at_call:
            return value
        if kind == "value":
            return value * float("nan")
        return value + torch.sqrt(a.sum() * 0.0)  # sqrt'(0) = inf: the gradient is NaN
    monkeypatch.setattr(adaptation, "sliced_wasserstein", swd)


def test_nan_loss_stops_and_restores_the_last_finite_weights(tiny_full_model, monkeypatch):
    checkpoint = tiny_full_model.checkpoint
    targets = [prepare_input(tiny_full_model.held_out[0][0], checkpoint.input_spec)]
    config = replace(FAST, iterations=20)
    ten_steps = adapt_model(checkpoint, targets, replace(config, iterations=10), torch.device("cpu"))
    _poison_swd(monkeypatch, 13, "value")
    record = adapt_model(checkpoint, targets, config, torch.device("cpu"))
    assert len(record.loss_curve) == 12 and record.loss_curve == ten_steps.loss_curve + record.loss_curve[10:]
    assert "iteration 13" in record.stopped_early and "after iteration 10" in record.stopped_early
    assert "learning rate" in record.stopped_early
    # the restored weights are exactly those after 10 finite steps
    assert network_states_equal(record.model.state_dict(), ten_steps.model.state_dict())
    assert np.isfinite(record.swd_after)


def test_nan_at_the_first_iteration_keeps_the_source_weights(tiny_full_model, monkeypatch):
    _poison_swd(monkeypatch, 1, "value")
    (result,), record = gmm_adapt(tiny_full_model.held_out[0][0], tiny_full_model.checkpoint, FAST, CPU)
    assert record.loss_curve == [] and "iteration 1;" in record.stopped_early
    assert "after iteration 0" in result.extra["stopped_early"]
    assert network_states_equal(record.model.state_dict(), tiny_full_model.checkpoint.seg_state)
    assert record.swd_after == record.swd_before


@pytest.mark.parametrize("at_call, iterations", [(10, 14), (6, 6)], ids=["mid-run", "last-iteration"])
def test_nan_gradient_never_leaves_non_finite_weights(tiny_full_model, monkeypatch, at_call, iterations):
    """A finite loss with a NaN gradient poisons the weights one step later (or at the very
    end): the run must still end on finite weights (here the source weights)."""
    _poison_swd(monkeypatch, at_call, "gradient")
    targets = [prepare_input(tiny_full_model.held_out[0][0], tiny_full_model.checkpoint.input_spec)]
    record = adapt_model(tiny_full_model.checkpoint, targets, replace(FAST, iterations=iterations),
                         torch.device("cpu"))
    assert record.stopped_early is not None and "after iteration 0" in record.stopped_early
    assert all(torch.isfinite(v).all() for v in record.model.state_dict().values())
    assert network_states_equal(record.model.state_dict(), tiny_full_model.checkpoint.seg_state)


def test_class_proportions_come_from_confident_predictions_never_from_labels(tiny_full_model):
    checkpoint = tiny_full_model.checkpoint
    for function in (gmm_adapt, adapt_model):
        assert not [p for p in inspect.signature(function).parameters if "label" in p.lower()]
    images = [image for image, _ in tiny_full_model.held_out[:2]]
    targets = [prepare_input(v, checkpoint.input_spec) for v in images]
    record = adapt_model(checkpoint, targets, replace(FAST, iterations=1, class_proportions="pseudo"),
                         torch.device("cpu"))
    counts = np.zeros(3)
    for probs in source_probabilities(checkpoint, images):
        half = probs.astype(np.float16)  # the library keeps probabilities in float16
        confident = half.max(0) > FAST.pseudo_confidence
        counts += np.bincount(half.argmax(0)[confident], minlength=3)
    shares = np.maximum(counts / counts.sum(), FAST.min_class_share)
    np.testing.assert_allclose(record.proportions, shares / shares.sum(), rtol=1e-12)
    truth = np.bincount(np.concatenate([l.array.ravel() for _, l in tiny_full_model.held_out[:2]]), minlength=3)
    assert not np.allclose(record.proportions, truth / truth.sum(), atol=1e-3)

    assert GMMConfig().class_proportions == "source"
    source = adapt_model(checkpoint, targets, replace(FAST, iterations=1), torch.device("cpu"))
    prototypes = ClassPrototypes.from_state(checkpoint.prototypes)
    assert prototypes.label_shares is not None  # recorded at fit time: the source class priors
    assert source.proportions == floored_proportions(prototypes.label_shares, FAST.min_class_share)


def test_several_targets_give_one_result_each_and_the_checkpoint_is_unchanged(tiny_full_model):
    checkpoint = tiny_full_model.checkpoint
    seg_before = {k: v.clone() for k, v in checkpoint.seg_state.items()}
    images = [image for image, _ in tiny_full_model.held_out]
    kept = [v.array.copy() for v in images]
    results, record = gmm_adapt(images, checkpoint, FAST, CPU)
    assert len(results) == len(images)
    for result, image, array in zip(results, images, kept):
        assert result.labels.shape == image.array.shape and result.geometry.matches(image.geometry)
        np.testing.assert_array_equal(image.array, array)
    assert network_states_equal(checkpoint.seg_state, seg_before)

    adapted = adapted_checkpoint(checkpoint, record, FAST, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    assert network_states_equal(checkpoint.seg_state, seg_before)
    assert not network_states_equal(adapted.seg_state, checkpoint.seg_state)
    assert network_states_equal(adapted.seg_state, record.model.state_dict())
    entry = adapted.provenance["gmm_adaptation"]
    assert entry["targets"] == ["a.nii.gz", "b.nii.gz", "c.nii.gz"] and entry["config"]["iterations"] == 6
    assert entry["swd_before"] == record.swd_before and "gmm_adaptation" not in checkpoint.provenance
    assert adapted.prototypes is checkpoint.prototypes and adapted.diffusion is checkpoint.diffusion


# --------------------------------------------------------------------------- PCA and plot


def test_embedding_pca_recovers_in_plane_coordinates():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 2)))  # an orthonormal plane in R^6
    offset = rng.normal(size=6)
    coords = np.stack([rng.normal(0, 3.0, 600), rng.normal(0, 1.0, 600)], 1)
    coords -= coords.mean(0)
    u, singular, _ = np.linalg.svd(coords, full_matrices=False)
    coords = u * singular  # exactly uncorrelated, the first axis has the larger variance
    samples = torch.from_numpy(offset + coords @ basis.T)
    labels = torch.from_numpy((coords[:, 0] > 0).astype(np.int64))
    before_coords = rng.normal(0, 2.0, size=(30, 2))
    after_coords = before_coords * 0.5
    pca = embedding_pca(samples, labels, torch.from_numpy(offset + before_coords @ basis.T),
                        torch.from_numpy(offset + after_coords @ basis.T), seed=0, points=400)
    assert len(pca["prototypes"]) == 400 and len(pca["before"]) == 30 and len(pca["after"]) == 30
    before = np.asarray(pca["before"])
    signs = np.sign(before[0] / before_coords[0])  # each principal axis has a free sign
    np.testing.assert_allclose(before, before_coords * signs, atol=1e-9)
    np.testing.assert_allclose(np.asarray(pca["after"]), after_coords * signs, atol=1e-9)
    proto = np.asarray(pca["prototypes"])
    assert ((proto[:, 0] * signs[0] > 0).astype(int) == proto[:, 2]).all()


def test_embedding_plot_is_a_valid_png_with_both_panels(tiny_full_model, tmp_path):
    (result,), _ = gmm_adapt(tiny_full_model.held_out[0][0], tiny_full_model.checkpoint, FAST, CPU)
    path = write_embedding_plot(result, tmp_path / "embeddings.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (420, 810, 3)
    np.testing.assert_array_equal(image, render_embedding_plot(result.extra["embedding_pca"],
                                                               [(0.6, 0.6, 0.6)] + [c.color for c in result.classes]))
    organ = np.array([round(c * 255) for c in reversed(result.classes[0].color)])
    for left, right in ((30, 390), (420, 780)):  # prototype dots of class 1 in each panel
        panel = image[30:390, left:right].astype(int)
        assert (np.abs(panel - organ).sum(-1) <= 3).sum() > 10
        assert (panel.sum(-1) == 0).sum() > 10  # black crosses: the target embeddings
    with pytest.raises(OSError):
        write_embedding_plot(result, Path(tmp_path / "missing_folder" / "x.png"))
