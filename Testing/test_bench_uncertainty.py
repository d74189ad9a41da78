"""The measurement core of ``benchmarks/bench_uncertainty.py`` (``measure_case``, ``summarise``),
which the real-data benchmark reuses: scores agree with the metrics computed directly, each
method gets its candidate maps, and the given results are left as they were."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from SFUDASegmentLib.config import GMMConfig, HEALConfig, InferenceConfig
from SFUDASegmentLib.evaluation.uncertainty_metrics import expected_calibration_error, voxel_auroc
from SFUDASegmentLib.gmm.adaptation import adapted_checkpoint, gmm_adapt
from SFUDASegmentLib.heal.pipeline import heal_adapt
from SFUDASegmentLib.inference.preparation import prepare_input
from SFUDASegmentLib.inference.segment import segment
from tiny_models import single_thread, tiny_full_model  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from bench_uncertainty import (MethodOutput, against_before_adaptation, measure_case, print_figures,  # noqa: E402
                               summarise)

CPU = InferenceConfig(device="cpu")


def test_measure_case_and_summarise(tiny_full_model):
    checkpoint = replace(tiny_full_model.checkpoint, temperature=1.7)
    cases = []
    for image, truth in tiny_full_model.held_out[:2]:
        none = segment(checkpoint, image, CPU)
        heal = heal_adapt(image, checkpoint, HEALConfig(stages="hd"), CPU)
        results, adaptation = gmm_adapt(image, checkpoint, GMMConfig(iterations=3), CPU)
        outputs = {"none": MethodOutput(none), "heal/hd": MethodOutput(heal),
                   "gmm": MethodOutput(results[0], adapted_checkpoint(checkpoint, adaptation, GMMConfig(), ["t"]))}
        maps_before = {name: sorted(o.result.maps) for name, o in outputs.items()}
        record = measure_case(image, truth.array, checkpoint, outputs, CPU)
        assert {name: sorted(o.result.maps) for name, o in outputs.items()} == maps_before  # untouched
        prepared = prepare_input(image, checkpoint.input_spec)
        body = prepared.to_input_grid(prepared.foreground, True)
        errors = (none.labels != truth.array) & body
        assert record["none"]["auroc"]["entropy"] == pytest.approx(voxel_auroc(none.maps["entropy"], errors, body))
        assert record["none"]["ece"]["raw"] == pytest.approx(
            expected_calibration_error(none.probabilities, truth.array, body))   # labels 0, 1, 2 = indices
        assert {"calibrated_entropy", "flip_entropy", "flip_variance", "mahalanobis"} <= set(record["none"]["auroc"])
        assert {"nig_variance", "label_disagreement", "flip_entropy"} <= set(record["heal/hd"]["auroc"])
        assert record["heal/hd"]["ece"] == {}
        assert {"disagreement", "label_disagreement", "source_entropy", "source_mahalanobis"} <= set(record["gmm"]["auroc"])
        assert {"ensemble_entropy", "source_flip_entropy"} <= set(record["gmm"]["auroc"])
        gmm_errors = (results[0].labels != truth.array) & body
        assert record["gmm"]["auroc"]["ensemble_entropy"] == pytest.approx(
            voxel_auroc(results[0].maps["ensemble_entropy"], gmm_errors, body))
        assert record["gmm"]["structures"]["organ"]["dice"] >= 0
        cases.append(record)
    rows = summarise(cases)
    row = next(r for r in rows if r["method"] == "none" and r["map"] == "entropy")
    finite = [c["none"]["auroc"]["entropy"] for c in cases if np.isfinite(c["none"]["auroc"]["entropy"])]
    assert row["cases"] == len(finite) and row["auroc"] == pytest.approx(np.mean(finite))
    assert set(row["spearman"]) == {"organ", "vessel"}
    paired = against_before_adaptation(cases)
    assert {r["method"] for r in paired} == {"heal/hd", "gmm"} and {r["baseline"] for r in paired} == {
        "entropy", "calibrated_entropy", "flip_entropy"}
    row = next(r for r in paired if r["method"] == "gmm" and r["map"] == "ensemble_entropy" and r["baseline"] == "entropy")
    differences = [c["gmm"]["auroc"]["ensemble_entropy"] - c["none"]["auroc"]["entropy"] for c in cases]
    assert row["cases"] == 2 and row["mean"] == pytest.approx(np.mean(differences))
    assert row["gains"] == sum(d > 0 for d in differences) and row["low"] <= row["mean"] <= row["high"]
    figures = print_figures(cases, "title")
    np.testing.assert_equal(figures, {"rows": rows, "paired": paired})  # NaN Spearman where a class is absent
