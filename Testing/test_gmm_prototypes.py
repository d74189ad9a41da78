"""SFS class prototypes (SFUDASegmentLib.gmm.prototypes): selection, reservoir, fit, state, sampling."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from SFUDASegmentLib.errors import CheckpointError, InputError
from SFUDASegmentLib.gmm.prototypes import ClassPrototypes, PrototypeAccumulator, check_compatible


def softmax_np(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def make_patch(rng: np.random.Generator, batch: int = 2, classes: int = 3, dim: int = 4,
               spatial: tuple[int, ...] = (3, 4, 5)):
    """Random 3D patch: embeddings (B, D, *S), labels (B, *S), probs (B, C, *S), float32."""
    labels = rng.integers(0, classes, size=(batch, *spatial))
    logits = rng.normal(size=(batch, classes, *spatial)) * 3.0
    # make most voxels confidently right, so every class gets voxels
    onehot = np.moveaxis(np.eye(classes)[labels], -1, 1)
    logits = logits + 6.0 * onehot
    probs = softmax_np(logits).astype(np.float32)
    embeddings = rng.normal(size=(batch, dim, *spatial)).astype(np.float32)
    embeddings += np.moveaxis(np.eye(classes, dim)[labels], -1, 1).astype(np.float32) * 2
    return embeddings, labels, probs


def expected_selection(embeddings, labels, probs, rho):
    """Independent numpy selection: flattened per class."""
    d = embeddings.shape[1]
    emb = np.moveaxis(embeddings, 1, -1).reshape(-1, d)
    lab = labels.reshape(-1)
    prob = np.moveaxis(probs, 1, -1).reshape(-1, probs.shape[1])
    keep = (prob.argmax(1) == lab) & (prob.max(1) > rho)
    return {c: emb[keep & (lab == c)] for c in range(probs.shape[1])}


def fitted(classes: int = 2, dim: int = 3, seed: int = 0) -> ClassPrototypes:
    rng = np.random.default_rng(seed)
    acc = PrototypeAccumulator(classes, dim, rho=0.5)
    e, l, p = make_patch(rng, classes=classes, dim=dim, spatial=(6, 6, 6))
    acc.add(torch.from_numpy(e), torch.from_numpy(l), torch.from_numpy(p))
    return acc.finalize()


def test_mean_and_covariance_equal_numpy_over_several_batches():
    rng = np.random.default_rng(1)
    acc = PrototypeAccumulator(num_classes=3, embedding_dim=4, rho=0.9, max_samples_per_class=10000)
    selections = {c: [] for c in range(3)}
    for _ in range(3):
        e, l, p = make_patch(rng)
        e_copy, l_copy, p_copy = e.copy(), l.copy(), p.copy()
        acc.add(torch.from_numpy(e), torch.from_numpy(l), torch.from_numpy(p))
        assert np.array_equal(e, e_copy) and np.array_equal(l, l_copy) and np.array_equal(p, p_copy)
        for c, rows in expected_selection(e, l, p, 0.9).items():
            selections[c].append(rows)
    protos = acc.finalize(shrinkage=0.0, min_variance=0.0)
    counts = [sum(len(r) for r in selections[c]) for c in range(3)]
    assert list(protos.counts) == counts and min(counts) > 10
    np.testing.assert_allclose(protos.weights.numpy(), np.array(counts) / sum(counts), atol=1e-12)
    assert protos.class_indices == (0, 1, 2) and protos.embedding_dim == 4
    for c in range(3):
        x = np.concatenate(selections[c]).astype(np.float64)
        np.testing.assert_allclose(protos.means[c].numpy(), x.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(protos.covariances[c].numpy(), np.cov(x, rowvar=False), atol=1e-5)


def test_shrinkage_formula_and_floor():
    rng = np.random.default_rng(2)
    e, l, p = make_patch(rng)
    acc = PrototypeAccumulator(3, 4, rho=0.9)
    acc.add(e, l, p)  # numpy input is accepted too
    s, floor = 0.2, 1e-3
    protos = acc.finalize(shrinkage=s, min_variance=floor)
    for c, x in expected_selection(e, l, p, 0.9).items():
        cov = np.cov(x.astype(np.float64), rowvar=False)
        expected = (1 - s) * cov + (s * np.trace(cov) / 4 + floor) * np.eye(4)
        np.testing.assert_allclose(protos.covariances[c].numpy(), expected, atol=1e-5)
    assert protos.shrinkage == s


def test_selection_on_hand_example():
    # 7 voxels, 2 classes, rho 0.97; the embedding is (voxel index, -voxel index)
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    p1 = torch.tensor([0.01, 0.04, 0.02, 0.99, 0.965, 0.5, 0.98])
    probs = torch.stack([1 - p1, p1], dim=1)
    # voxel 0: label 0, p0 .99 -> yes; 1: p0 .96 -> too unsure; 2: label 1 but predicted 0;
    # 3: yes; 4: p1 .965 <= rho; 5: p 0.5 -> no; 6: yes
    index = torch.arange(7, dtype=torch.float32)
    embeddings = torch.stack([index, -index], dim=1)
    acc = PrototypeAccumulator(2, 2, rho=0.97)
    acc.add(embeddings, labels, probs)
    assert acc.selected_counts == [1, 2]
    assert acc.samples(0)[:, 0].tolist() == [0.0]
    assert acc.samples(1)[:, 0].tolist() == [3.0, 6.0]


def test_selection_keeps_spatial_layout_of_batched_patches():
    # (B, D, y, x): embedding channel 0 encodes the flat voxel id, so the kept ids are checkable
    b, y, x = 2, 3, 4
    ids = torch.arange(b * y * x, dtype=torch.float32).reshape(b, y, x)
    embeddings = torch.stack([ids, ids * 2, torch.zeros_like(ids)], dim=1)      # (B, 3, y, x)
    labels = (ids.long() % 3)
    probs = torch.full((b, 3, y, x), 0.005)
    confident = (ids.long() % 2 == 0)            # even ids confident and correct
    probs.scatter_(1, labels[:, None], 0.99)
    probs = torch.where(confident[:, None], probs, torch.full_like(probs, 1 / 3))
    acc = PrototypeAccumulator(3, 3, rho=0.97)
    acc.add(embeddings, labels, probs)
    for c in range(3):
        expected = [i for i in range(b * y * x) if i % 3 == c and i % 2 == 0]
        assert acc.samples(c)[:, 0].tolist() == [float(i) for i in expected]
        assert acc.samples(c)[:, 1].tolist() == [2.0 * i for i in expected]


def test_reservoir_keeps_exactly_max_samples_and_is_unbiased():
    capacity = 500
    acc = PrototypeAccumulator(1, 1, rho=0.0, max_samples_per_class=capacity, seed=3)
    stream = np.arange(100000, dtype=np.float32)
    rng = np.random.default_rng(4)
    start = 0
    while start < len(stream):
        size = int(rng.integers(1, 7000))
        chunk = torch.from_numpy(stream[start:start + size]).reshape(-1, 1)
        acc.add(chunk, torch.zeros(len(chunk), dtype=torch.long), torch.ones(len(chunk), 1))
        start += size
    kept = acc.samples(0)[:, 0].numpy()
    assert acc.selected_counts == [100000]
    assert len(kept) == capacity and len(np.unique(kept)) == capacity      # no duplicates
    # the uniform stream 0..99999 has mean 49999.5 and sd 28868; the mean of 500 uniform
    # draws has sd ~1290: 4 sd tolerance. The late half must not dominate either.
    assert abs(kept.mean() - 49999.5) < 5200
    assert 0.4 < np.mean(kept >= 50000) < 0.6


def test_reservoir_inclusion_probabilities_are_uniform():
    # 40 items, capacity 8, batches of 3, 11, 1, 25: each item kept with probability 0.2
    reps, n, capacity = 1000, 40, 8
    hits = np.zeros(n)
    values = torch.arange(n, dtype=torch.float32).reshape(-1, 1)
    for seed in range(reps):
        acc = PrototypeAccumulator(1, 1, rho=0.0, max_samples_per_class=capacity, seed=seed)
        for lo, hi in [(0, 3), (3, 14), (14, 15), (15, 40)]:
            acc.add(values[lo:hi], torch.zeros(hi - lo, dtype=torch.long), torch.ones(hi - lo, 1))
        hits[acc.samples(0)[:, 0].numpy().astype(int)] += 1
    # Binomial(1000, 0.2): mean 200, sd 12.6 (the seeds are fixed, so this is deterministic)
    assert np.all(np.abs(hits - 200) < 60), hits


def test_shrinkage_makes_rank_deficient_covariance_positive_definite():
    # class 0 on a line in 3D (rank 1), class 1 a single repeated point (rank 0)
    t = torch.linspace(-1, 1, 20)
    line = torch.stack([t, 2 * t, -t], dim=1)
    point = torch.ones(5, 3)
    embeddings = torch.cat([line, point])
    labels = torch.cat([torch.zeros(20), torch.ones(5)]).long()
    probs = torch.nn.functional.one_hot(labels, 2).float()
    acc = PrototypeAccumulator(2, 3, rho=0.5)
    acc.add(embeddings, labels, probs)
    raw = np.cov(line.double().numpy(), rowvar=False)
    assert np.linalg.matrix_rank(raw) == 1
    protos = acc.finalize(shrinkage=1e-3)
    for c in range(2):
        eigenvalues = torch.linalg.eigvalsh(protos.covariances[c])
        assert float(eigenvalues.min()) > 0
    assert float(torch.linalg.eigvalsh(protos.covariances[0]).min()) == pytest.approx(
        1e-3 * np.trace(raw) / 3 + 1e-6, rel=1e-6)
    torch.testing.assert_close(protos.covariances[1], 1e-6 * torch.eye(3, dtype=torch.float64))


def test_too_few_voxels_names_the_class():
    acc = PrototypeAccumulator(3, 2, rho=0.97)
    labels = torch.tensor([0, 0, 0, 1, 2])
    probs = torch.nn.functional.one_hot(labels, 3).float()
    acc.add(torch.randn(5, 2), labels, probs)
    with pytest.raises(InputError, match=r"class 1 \(1 voxel\), class 2 \(1 voxel\).*Lower rho"):
        acc.finalize()


def test_add_rejects_bad_input():
    acc = PrototypeAccumulator(2, 3)
    good_e, good_l = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    good_p = torch.softmax(torch.randn(2, 2, 4, 4), dim=1)
    with pytest.raises(InputError, match="logits"):
        acc.add(good_e, good_l, torch.randn(2, 2, 4, 4) * 5)
    with pytest.raises(InputError, match="do not match"):
        acc.add(good_e, good_l[:, :3], good_p)
    with pytest.raises(InputError, match="Embeddings must be"):
        acc.add(torch.randn(2, 5, 4, 4), good_l, good_p)
    with pytest.raises(InputError, match="class indices 0..1"):
        acc.add(good_e, good_l + 4, good_p)
    with pytest.raises(InputError, match="rho"):
        PrototypeAccumulator(2, 3, rho=1.5)


def test_state_round_trip_is_exact_through_weights_only_load():
    protos = fitted(classes=3, dim=4)
    buffer = io.BytesIO()
    torch.save(protos.to_state(), buffer)
    buffer.seek(0)
    restored = ClassPrototypes.from_state(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.means, protos.means)
    assert torch.equal(restored.covariances, protos.covariances)
    assert torch.equal(restored.weights, protos.weights)
    assert restored.class_indices == protos.class_indices and restored.counts == protos.counts
    assert (restored.rho, restored.embedding_layer, restored.embedding_dim, restored.shrinkage) == \
        (protos.rho, protos.embedding_layer, protos.embedding_dim, protos.shrinkage)
    assert restored.label_counts is None  # prototypes written before label counts were recorded
    with_priors = replace(protos, label_counts=(90, 8, 2))
    buffer = io.BytesIO()
    torch.save(with_priors.to_state(), buffer)
    buffer.seek(0)
    restored = ClassPrototypes.from_state(torch.load(buffer, weights_only=True))
    assert restored.label_counts == (90, 8, 2) and restored.label_shares == [0.9, 0.08, 0.02]


def broken(change) -> dict:
    state = fitted(classes=2, dim=3).to_state()
    change(state)
    return state


@pytest.mark.parametrize("change,message", [
    (lambda s: s["covariances"].__setitem__((1, 0, 0), -5.0), "class 1 is not positive definite"),
    (lambda s: s.__setitem__("means", torch.zeros(2, 4, dtype=torch.float64)), r"means have shape \(2, 4\)"),
    (lambda s: s.__setitem__("covariances", torch.zeros(2, 3, dtype=torch.float64)), "covariances have shape"),
    (lambda s: s["means"].__setitem__((0, 1), float("nan")), "NaN"),
    (lambda s: s["covariances"].__setitem__((0, 0, 1), 0.3), "class 0 is not symmetric"),
    (lambda s: s.__setitem__("weights", torch.tensor([0.7, 0.7], dtype=torch.float64)), "sum to 1"),
    (lambda s: s.pop("covariances"), "lack covariances"),
    (lambda s: s.__setitem__("class_indices", [0]), r"weights have shape|means have shape"),
    (lambda s: s.__setitem__("embedding_dim", "three"), "mistyped"),
    (lambda s: s.__setitem__("version", 99), "version 99"),
    (lambda s: s.__setitem__("label_counts", [5]), "label counts"),
    (lambda s: s.__setitem__("label_counts", [0, 0]), "positive sum"),
])
def test_from_state_rejects_invalid(change, message):
    with pytest.raises(CheckpointError, match=message) as info:
        ClassPrototypes.from_state(broken(change))
    assert "fit-prototypes" in str(info.value)


def test_sample_mean_and_covariance_and_reproducibility():
    means = torch.tensor([[0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    covariances = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.8], [0.8, 0.5]]], dtype=torch.float64)
    protos = ClassPrototypes(means, covariances, torch.tensor([0.25, 0.75], dtype=torch.float64),
                             class_indices=(0, 1), counts=(10, 30), rho=0.97,
                             embedding_layer="decoder_final", embedding_dim=2)
    protos.validate()
    z, y = protos.sample({1: 40000, 0: 100}, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    assert z.shape == (40100, 2) and y.dtype == torch.int64
    assert int((y == 0).sum()) == 100 and int((y == 1).sum()) == 40000
    z1 = z[y == 1].numpy()
    # sd of the mean ~ sqrt(2/40000) = 0.007; covariance entries within ~0.02
    np.testing.assert_allclose(z1.mean(axis=0), [3.0, -1.0], atol=0.04)
    np.testing.assert_allclose(np.cov(z1, rowvar=False), covariances[1].numpy(), atol=0.06)
    z_again, y_again = protos.sample([100, 40000], generator=torch.Generator().manual_seed(0),
                                     dtype=torch.float64)
    assert torch.equal(z, z_again) and torch.equal(y, y_again)
    z_other, _ = protos.sample([100, 40000], generator=torch.Generator().manual_seed(1),
                               dtype=torch.float64)
    assert not torch.equal(z, z_other)
    z32, _ = protos.sample([3, 0])
    assert z32.dtype == torch.float32 and z32.shape == (3, 2)
    with pytest.raises(InputError, match="No prototype for class"):
        protos.sample({5: 3})
    with pytest.raises(InputError, match="3 sample counts"):
        protos.sample([1, 2, 3])
    with pytest.raises(InputError, match=">= 0"):
        protos.sample([1, -2])


def test_allocate_largest_remainder():
    protos = fitted(classes=3, dim=2)
    assert sum(protos.allocate(1001)) == 1001
    assert protos.allocate(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert protos.allocate(7, [1.0, 1.0, 1.0]) == [3, 2, 2]
    assert protos.allocate(4, [0.0, 0.0, 2.0]) == [0, 0, 4]
    with pytest.raises(InputError, match="proportions"):
        protos.allocate(10, [1.0, -1.0, 0.0])


def test_check_compatible_errors():
    protos = fitted(classes=3, dim=4)
    check_compatible(protos, embedding_dim=4, num_classes=3)
    with pytest.raises(CheckpointError, match=r"4-dimensional.*has 8 channels.*fit-prototypes"):
        check_compatible(protos, embedding_dim=8, num_classes=3)
    with pytest.raises(CheckpointError, match=r"no prototype for class\(es\) \[3\].*fit-prototypes"):
        check_compatible(protos, embedding_dim=4, num_classes=4)
    with pytest.raises(CheckpointError, match=r"class\(es\) \[2\] that the 2-class network"):
        check_compatible(protos, embedding_dim=4, num_classes=2)
    with pytest.raises(CheckpointError, match="no GMM prototypes"):
        check_compatible(None, embedding_dim=4, num_classes=3)


def test_describe():
    protos = fitted(classes=2, dim=3)
    info = protos.describe()
    assert info["embedding_layer"] == "decoder_final" and info["embedding_dim"] == 3
    assert info["num_classes"] == 2 and info["rho"] == 0.5
    assert [c["class_index"] for c in info["classes"]] == [0, 1]
    assert info["classes"][1]["covariance_trace"] == pytest.approx(float(torch.trace(protos.covariances[1])))
    assert sum(c["weight"] for c in info["classes"]) == pytest.approx(1.0)
    assert all(c["covariance_condition"] >= 1.0 for c in info["classes"])
