"""How far to trust an uncertainty map: measured reliabilities, put in words a clinician reads.

The reliability table
---------------------
A JSON-friendly dict (``load_reliability_table`` reads one from a file)::

    {"format": "sfuda-uncertainty-reliability", "version": 1,
     "entries": [
        {"method": "none",                  # method_key() of the result (see below)
         "map": "entropy",                  # name in Result.maps
         "source_modality": "T2",           # the checkpoint's input_spec.modality, or "*"
         "target_modality": "FLAIR",        # the scan's modality, or "*"
         "auroc": 0.88,                     # mean voxel AUROC for the method's own errors
         "auprc": 0.41,                     # optional: mean voxel AUPRC
         "cases": 6,                        # scans the means are over
         "data": "BraTS 2018 development benchmark, 2D T2 model",   # what it was measured on
         "phantom": false,                  # true: synthetic phantoms, not patient scans
         "misleading": false,               # optional: known to look confident where wrong
         "note": "..."}                     # optional: a sentence shown with the figure
     ]}

``method`` is ``"none"``, ``"gmm"``, ``"heal"`` (full HEAL), ``"heal/hd"`` or ``"heal/hd+egs"``
(the HEAL ablation stages). Lookup prefers an entry whose modalities both match, then one whose
source modality matches, then any entry of the method and map (whatever its modalities; the
statement then says which data it came from).

:data:`DEFAULT_TABLE` ships with the library; its figures come from synthetic phantoms
(``Testing/benchmarks/bench_uncertainty.py --phantoms``, said so in every statement that uses
them) and from real BraTS 2018 scans: T2 models on FLAIR, T1 models on T1c, T1c models on FLAIR
(``--brats``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..errors import InputError

TABLE_FORMAT = "sfuda-uncertainty-reliability"
TABLE_VERSION = 1
METHOD_KEYS = ("none", "gmm", "heal", "heal/hd", "heal/hd+egs")

#: Below this AUROC a map is too close to chance (0.5) to guide a reader.
MISLEADING_AUROC = 0.6

_ADAPTED_ENTROPY = ("after GMM adaptation the adapted model's own entropy looks confident where the "
                    "segmentation is wrong (measured on a spinal-cord scan, source T1w, target T2w: mean "
                    "entropy fell from 0.656 to 0.199 bits while Dice stayed 0.0)")

#: Maps known to mislead after a method, whatever the table says, with the evidence. The
#: temperature-scaled entropy ranks voxels as the entropy does (exactly so with two classes).
KNOWN_MISLEADING: dict[tuple[str, str], str] = {
    ("gmm", "entropy"): _ADAPTED_ENTROPY,
    ("gmm", "calibrated_entropy"): _ADAPTED_ENTROPY,
}

#: The map shown when the table has no figure for a method, in order of preference.
FALLBACK_ORDER: dict[str, tuple[str, ...]] = {
    "none": ("entropy", "calibrated_entropy", "flip_entropy"),
    "gmm": ("ensemble_entropy", "nig_variance", "disagreement"),
    "heal": ("candidate_spread", "entropy", "nig_variance"),
    "heal/hd": ("entropy", "nig_variance"),
    "heal/hd+egs": ("candidate_spread", "entropy", "nig_variance"),
}

_PHANTOMS: dict[str, Any] = {
    "source_modality": "phantom-source", "target_modality": "phantom-target", "cases": 16, "phantom": True,
    "data": "synthetic phantoms (2D model trained on 64x64 source-modality phantoms; 16 target-modality "
            "phantoms at domain gap 0.3)"}

#: Figures measured on synthetic phantoms, not patient scans: mean voxel AUROC / AUPRC for each
#: method's own errors inside the body (``python Testing/benchmarks/bench_uncertainty.py
#: --phantoms --cases 16 --gap 0.3 --threads 1``; the README has the whole table).
PHANTOM_ENTRIES: list[dict[str, Any]] = [
    {**_PHANTOMS, "method": "none", "map": "calibrated_entropy", "auroc": 0.758, "auprc": 0.267},
    {**_PHANTOMS, "method": "none", "map": "entropy", "auroc": 0.758, "auprc": 0.265},
    {**_PHANTOMS, "method": "none", "map": "flip_entropy", "auroc": 0.772, "auprc": 0.278},
    {**_PHANTOMS, "method": "none", "map": "flip_variance", "auroc": 0.775, "auprc": 0.283},
    {**_PHANTOMS, "method": "none", "map": "mahalanobis", "auroc": 0.679, "auprc": 0.196},
    {**_PHANTOMS, "method": "none", "map": "nig_variance", "auroc": 0.758, "auprc": 0.269},
    {**_PHANTOMS, "method": "heal/hd", "map": "calibrated_entropy", "auroc": 0.740, "auprc": 0.212},
    {**_PHANTOMS, "method": "heal/hd", "map": "entropy", "auroc": 0.739, "auprc": 0.210},
    {**_PHANTOMS, "method": "heal/hd", "map": "flip_entropy", "auroc": 0.755, "auprc": 0.224},
    {**_PHANTOMS, "method": "heal/hd", "map": "flip_variance", "auroc": 0.759, "auprc": 0.239},
    {**_PHANTOMS, "method": "heal/hd", "map": "label_disagreement", "auroc": 0.502, "auprc": 0.078},
    {**_PHANTOMS, "method": "heal/hd", "map": "mahalanobis", "auroc": 0.668, "auprc": 0.182},
    {**_PHANTOMS, "method": "heal/hd", "map": "nig_variance", "auroc": 0.741, "auprc": 0.228},
    {**_PHANTOMS, "method": "heal", "map": "calibrated_entropy", "auroc": 0.730, "auprc": 0.194},
    {**_PHANTOMS, "method": "heal", "map": "candidate_spread", "auroc": 0.593, "auprc": 0.123},
    {**_PHANTOMS, "method": "heal", "map": "entropy", "auroc": 0.729, "auprc": 0.192},
    {**_PHANTOMS, "method": "heal", "map": "flip_entropy", "auroc": 0.745, "auprc": 0.206},
    {**_PHANTOMS, "method": "heal", "map": "flip_variance", "auroc": 0.750, "auprc": 0.228},
    {**_PHANTOMS, "method": "heal", "map": "label_disagreement", "auroc": 0.530, "auprc": 0.095},
    {**_PHANTOMS, "method": "heal", "map": "mahalanobis", "auroc": 0.668, "auprc": 0.191},
    {**_PHANTOMS, "method": "heal", "map": "nig_variance", "auroc": 0.730, "auprc": 0.197},
    {**_PHANTOMS, "method": "gmm", "map": "calibrated_entropy", "auroc": 0.766, "auprc": 0.297},
    {**_PHANTOMS, "method": "gmm", "map": "disagreement", "auroc": 0.747, "auprc": 0.280},
    {**_PHANTOMS, "method": "gmm", "map": "ensemble_entropy", "auroc": 0.774, "auprc": 0.285},
    {**_PHANTOMS, "method": "gmm", "map": "entropy", "auroc": 0.765, "auprc": 0.295},
    {**_PHANTOMS, "method": "gmm", "map": "flip_entropy", "auroc": 0.781, "auprc": 0.322},
    {**_PHANTOMS, "method": "gmm", "map": "flip_variance", "auroc": 0.780, "auprc": 0.317},
    {**_PHANTOMS, "method": "gmm", "map": "label_disagreement", "auroc": 0.573, "auprc": 0.152},
    {**_PHANTOMS, "method": "gmm", "map": "mahalanobis", "auroc": 0.695, "auprc": 0.239},
    {**_PHANTOMS, "method": "gmm", "map": "nig_variance", "auroc": 0.771, "auprc": 0.302},
]

def _brats(source: str, target: str) -> dict[str, Any]:
    """The fields of a real-BraTS entry: the benchmark's 2D ``source`` models on ``target`` scans."""
    return {"source_modality": source, "target_modality": target, "cases": 10, "phantom": False,
            "data": f"real BraTS 2018 scans (2D {source} models of the development benchmark, 2 mm, each applied "
                    f"to the {target} scans of the 5 patients of its fold it never saw; 10 patients in all)"}


_BRATS_T2, _BRATS_T1, _BRATS_T1C = _brats("T2", "FLAIR"), _brats("T1", "T1c"), _brats("T1c", "FLAIR")

#: Figures measured on patient scans: mean voxel AUROC / AUPRC for each method's own errors inside
#: the brain (``python Testing/benchmarks/bench_uncertainty.py --brats WORKDIR --no-diffusion
#: --threads 1 --direction t2:flair`` and ``t1:t1ce``, ``t1ce:flair``, WORKDIR holding
#: ``bench_brats.py``'s models; HEAL's default, denoising only; GMM 100 iterations, guard off;
#: the README has the T2 -> FLAIR table and the default maps of the other two).
BRATS_ENTRIES: list[dict[str, Any]] = [
    {**_BRATS_T2, "method": "none", "map": "calibrated_entropy", "auroc": 0.923, "auprc": 0.611},
    {**_BRATS_T2, "method": "none", "map": "entropy", "auroc": 0.921, "auprc": 0.605},
    {**_BRATS_T2, "method": "none", "map": "flip_entropy", "auroc": 0.931, "auprc": 0.627},
    {**_BRATS_T2, "method": "none", "map": "flip_variance", "auroc": 0.897, "auprc": 0.504},
    {**_BRATS_T2, "method": "none", "map": "mahalanobis", "auroc": 0.671, "auprc": 0.218},
    {**_BRATS_T2, "method": "none", "map": "nig_variance", "auroc": 0.917, "auprc": 0.532},
    {**_BRATS_T2, "method": "heal/hd", "map": "calibrated_entropy", "auroc": 0.921, "auprc": 0.601},
    {**_BRATS_T2, "method": "heal/hd", "map": "entropy", "auroc": 0.920, "auprc": 0.595},
    {**_BRATS_T2, "method": "heal/hd", "map": "flip_entropy", "auroc": 0.929, "auprc": 0.619},
    {**_BRATS_T2, "method": "heal/hd", "map": "flip_variance", "auroc": 0.896, "auprc": 0.496},
    {**_BRATS_T2, "method": "heal/hd", "map": "label_disagreement", "auroc": 0.500, "auprc": 0.119},
    {**_BRATS_T2, "method": "heal/hd", "map": "mahalanobis", "auroc": 0.671, "auprc": 0.216},
    {**_BRATS_T2, "method": "heal/hd", "map": "nig_variance", "auroc": 0.916, "auprc": 0.526},
    {**_BRATS_T2, "method": "gmm", "map": "calibrated_entropy", "auroc": 0.896, "auprc": 0.530},
    {**_BRATS_T2, "method": "gmm", "map": "disagreement", "auroc": 0.871, "auprc": 0.376},
    {**_BRATS_T2, "method": "gmm", "map": "ensemble_entropy", "auroc": 0.923, "auprc": 0.559},
    {**_BRATS_T2, "method": "gmm", "map": "entropy", "auroc": 0.897, "auprc": 0.531},
    {**_BRATS_T2, "method": "gmm", "map": "flip_entropy", "auroc": 0.916, "auprc": 0.568},
    {**_BRATS_T2, "method": "gmm", "map": "flip_variance", "auroc": 0.912, "auprc": 0.543},
    {**_BRATS_T2, "method": "gmm", "map": "label_disagreement", "auroc": 0.651, "auprc": 0.230},
    {**_BRATS_T2, "method": "gmm", "map": "mahalanobis", "auroc": 0.739, "auprc": 0.212},
    {**_BRATS_T2, "method": "gmm", "map": "nig_variance", "auroc": 0.910, "auprc": 0.515},
    {**_BRATS_T1, "method": "none", "map": "calibrated_entropy", "auroc": 0.809, "auprc": 0.536},
    {**_BRATS_T1, "method": "none", "map": "entropy", "auroc": 0.808, "auprc": 0.531},
    {**_BRATS_T1, "method": "none", "map": "flip_entropy", "auroc": 0.816, "auprc": 0.515},
    {**_BRATS_T1, "method": "none", "map": "flip_variance", "auroc": 0.770, "auprc": 0.369},
    {**_BRATS_T1, "method": "none", "map": "mahalanobis", "auroc": 0.556, "auprc": 0.305},
    {**_BRATS_T1, "method": "none", "map": "nig_variance", "auroc": 0.755, "auprc": 0.316},
    {**_BRATS_T1, "method": "heal/hd", "map": "calibrated_entropy", "auroc": 0.809, "auprc": 0.536},
    {**_BRATS_T1, "method": "heal/hd", "map": "entropy", "auroc": 0.808, "auprc": 0.531},
    {**_BRATS_T1, "method": "heal/hd", "map": "flip_entropy", "auroc": 0.816, "auprc": 0.515},
    {**_BRATS_T1, "method": "heal/hd", "map": "flip_variance", "auroc": 0.770, "auprc": 0.369},
    {**_BRATS_T1, "method": "heal/hd", "map": "label_disagreement", "auroc": 0.500, "auprc": 0.151},
    {**_BRATS_T1, "method": "heal/hd", "map": "mahalanobis", "auroc": 0.555, "auprc": 0.305},
    {**_BRATS_T1, "method": "heal/hd", "map": "nig_variance", "auroc": 0.755, "auprc": 0.316},
    {**_BRATS_T1, "method": "gmm", "map": "calibrated_entropy", "auroc": 0.748, "auprc": 0.430},
    {**_BRATS_T1, "method": "gmm", "map": "disagreement", "auroc": 0.746, "auprc": 0.347},
    {**_BRATS_T1, "method": "gmm", "map": "ensemble_entropy", "auroc": 0.779, "auprc": 0.409},
    {**_BRATS_T1, "method": "gmm", "map": "entropy", "auroc": 0.748, "auprc": 0.430},
    {**_BRATS_T1, "method": "gmm", "map": "flip_entropy", "auroc": 0.777, "auprc": 0.423},
    {**_BRATS_T1, "method": "gmm", "map": "flip_variance", "auroc": 0.771, "auprc": 0.406},
    {**_BRATS_T1, "method": "gmm", "map": "label_disagreement", "auroc": 0.662, "auprc": 0.269},
    {**_BRATS_T1, "method": "gmm", "map": "mahalanobis", "auroc": 0.562, "auprc": 0.293},
    {**_BRATS_T1, "method": "gmm", "map": "nig_variance", "auroc": 0.735, "auprc": 0.289},
    {**_BRATS_T1C, "method": "none", "map": "calibrated_entropy", "auroc": 0.784, "auprc": 0.416},
    {**_BRATS_T1C, "method": "none", "map": "entropy", "auroc": 0.773, "auprc": 0.401},
    {**_BRATS_T1C, "method": "none", "map": "flip_entropy", "auroc": 0.804, "auprc": 0.449},
    {**_BRATS_T1C, "method": "none", "map": "flip_variance", "auroc": 0.799, "auprc": 0.439},
    {**_BRATS_T1C, "method": "none", "map": "mahalanobis", "auroc": 0.633, "auprc": 0.173},
    {**_BRATS_T1C, "method": "none", "map": "nig_variance", "auroc": 0.824, "auprc": 0.463},
    {**_BRATS_T1C, "method": "heal/hd", "map": "calibrated_entropy", "auroc": 0.776, "auprc": 0.387},
    {**_BRATS_T1C, "method": "heal/hd", "map": "entropy", "auroc": 0.765, "auprc": 0.368},
    {**_BRATS_T1C, "method": "heal/hd", "map": "flip_entropy", "auroc": 0.796, "auprc": 0.419},
    {**_BRATS_T1C, "method": "heal/hd", "map": "flip_variance", "auroc": 0.792, "auprc": 0.420},
    {**_BRATS_T1C, "method": "heal/hd", "map": "label_disagreement", "auroc": 0.501, "auprc": 0.103},
    {**_BRATS_T1C, "method": "heal/hd", "map": "mahalanobis", "auroc": 0.626, "auprc": 0.167},
    {**_BRATS_T1C, "method": "heal/hd", "map": "nig_variance", "auroc": 0.818, "auprc": 0.432},
    {**_BRATS_T1C, "method": "gmm", "map": "calibrated_entropy", "auroc": 0.832, "auprc": 0.462},
    {**_BRATS_T1C, "method": "gmm", "map": "disagreement", "auroc": 0.852, "auprc": 0.539},
    {**_BRATS_T1C, "method": "gmm", "map": "ensemble_entropy", "auroc": 0.891, "auprc": 0.538},
    {**_BRATS_T1C, "method": "gmm", "map": "entropy", "auroc": 0.822, "auprc": 0.450},
    {**_BRATS_T1C, "method": "gmm", "map": "flip_entropy", "auroc": 0.864, "auprc": 0.514},
    {**_BRATS_T1C, "method": "gmm", "map": "flip_variance", "auroc": 0.852, "auprc": 0.471},
    {**_BRATS_T1C, "method": "gmm", "map": "label_disagreement", "auroc": 0.667, "auprc": 0.342},
    {**_BRATS_T1C, "method": "gmm", "map": "mahalanobis", "auroc": 0.651, "auprc": 0.174},
    {**_BRATS_T1C, "method": "gmm", "map": "nig_variance", "auroc": 0.871, "auprc": 0.516},
]

DEFAULT_TABLE: dict[str, Any] = {"format": TABLE_FORMAT, "version": TABLE_VERSION,
                                 "entries": PHANTOM_ENTRIES + BRATS_ENTRIES}


def method_key(method: str, heal_stages: Optional[str] = None) -> str:
    """The table's method name: ``"heal"`` for full HEAL, ``"heal/<stages>"`` for its ablation
    stages, the method otherwise."""
    if method == "heal" and heal_stages and heal_stages != "heal":
        return f"heal/{heal_stages}"
    return method


def validate_table(table: Any, source: str = "reliability table") -> dict[str, Any]:
    """Check a table against the schema above; returns it.

    Raises:
        InputError: naming the first malformed entry.
    """
    if not isinstance(table, Mapping) or table.get("format") != TABLE_FORMAT:
        raise InputError(f"The {source} is not a '{TABLE_FORMAT}' table (see uncertainty/reliability.py).")
    if table.get("version") != TABLE_VERSION:
        raise InputError(f"The {source} has version {table.get('version')!r}; this library reads "
                         f"version {TABLE_VERSION}.")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise InputError(f"The {source} needs a list of 'entries'.")
    for i, entry in enumerate(entries):
        where = f"entry {i} of the {source}"
        if not isinstance(entry, Mapping):
            raise InputError(f"{where} is not a dict.")
        missing = [k for k in ("method", "map", "source_modality", "target_modality", "auroc", "cases", "data")
                   if k not in entry]
        if missing:
            raise InputError(f"{where} lacks {', '.join(missing)}.")
        if entry["method"] not in METHOD_KEYS:
            raise InputError(f"{where} has method {entry['method']!r}; use one of {METHOD_KEYS}.")
        auroc = entry["auroc"]
        if isinstance(auroc, bool) or not isinstance(auroc, (int, float)) or not 0.0 <= float(auroc) <= 1.0:
            raise InputError(f"{where} has AUROC {auroc!r}; it must be a number in [0, 1].")
        if isinstance(entry["cases"], bool) or not isinstance(entry["cases"], int) or entry["cases"] < 1:
            raise InputError(f"{where} has {entry['cases']!r} cases; it must be a positive integer.")
    return dict(table)


def load_reliability_table(path: str | Path) -> dict[str, Any]:
    """Read and validate a reliability table from a JSON file.

    Raises:
        InputError: a missing, unreadable or malformed file.
    """
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot read the reliability table '{path}' ({error}). Give a JSON file "
                         "in the format of uncertainty/reliability.py.") from error
    return validate_table(table, f"reliability table '{path}'")


def _matching(entries: Iterable[Mapping[str, Any]], method: str, map_name: str,
              source_modality: Optional[str], target_modality: Optional[str]) -> list[Mapping[str, Any]]:
    """The best-matching entries (both modalities, then the source one, then any)."""
    candidates = [e for e in entries if e["method"] == method and e["map"] == map_name]

    def fits(value: str, wanted: Optional[str]) -> bool:
        return wanted is not None and value in ("*", wanted)

    for test in (lambda e: fits(e["source_modality"], source_modality) and fits(e["target_modality"], target_modality),
                 lambda e: fits(e["source_modality"], source_modality)):
        chosen = [e for e in candidates if test(e)]
        if chosen:
            return chosen
    return candidates


def recommended_map(method: str, available: Sequence[str], table: Mapping[str, Any] = DEFAULT_TABLE,
                    source_modality: Optional[str] = None, target_modality: Optional[str] = None) -> Optional[str]:
    """The available map that found the method's errors best in the table (highest mean AUROC
    of the best-matching entries, maps known to mislead excluded), else the first available
    map of :data:`FALLBACK_ORDER`, else the first available map; None when there is none."""
    scored = []
    for name in available:
        if (method, name) in KNOWN_MISLEADING:
            continue
        entries = _matching(table["entries"], method, name, source_modality, target_modality)
        if entries and not any(e.get("misleading") for e in entries):
            scored.append((sum(float(e["auroc"]) for e in entries) / len(entries), name))
    if scored:
        return max(scored)[1]
    for name in FALLBACK_ORDER.get(method, ()):
        if name in available:
            return name
    return next(iter(available), None)


_METHOD_WORDS = {"none": "the unadapted source model", "gmm": "GMM adaptation", "heal": "HEAL",
                 "heal/hd": "HEAL's denoising", "heal/hd+egs": "HEAL's selected candidate"}


def _grade(auroc: float) -> str:
    if auroc >= 0.9:
        return "good"
    if auroc >= 0.8:
        return "fair"
    if auroc >= 0.7:
        return "weak"
    return "poor"


def trust_statement(method: str, map_name: Optional[str], table: Mapping[str, Any] = DEFAULT_TABLE,
                    source_modality: Optional[str] = None,
                    target_modality: Optional[str] = None) -> dict[str, Any]:
    """How far the map ``map_name`` can be trusted to show where ``method`` went wrong.

    Returns:
        ``{"map", "method", "auroc", "auprc", "cases", "measured_on", "phantom", "grade",
        "text", "warnings"}``: ``auroc`` is the mean over the matching entries (None when the
        table has none), ``text`` one or two sentences for the reader, ``warnings`` a list of
        sentences (a map known to mislead, a figure close to chance, figures from phantoms).
    """
    who = _METHOD_WORDS.get(method, method)
    out: dict[str, Any] = {"map": map_name, "method": method, "auroc": None, "auprc": None, "cases": 0,
                           "measured_on": None, "phantom": None, "grade": None, "warnings": []}
    if map_name is None:
        out["text"] = ("No uncertainty map was computed for this result (labels only), so nothing shows "
                       "where it may be wrong. Run it with probabilities to get one.")
        return out
    entries = _matching(table["entries"], method, map_name, source_modality, target_modality)
    if entries:
        auroc = sum(float(e["auroc"]) for e in entries) / len(entries)
        auprcs = [float(e["auprc"]) for e in entries if e.get("auprc") is not None]
        phantom = all(bool(e.get("phantom")) for e in entries)
        data = "; ".join(sorted({str(e["data"]) for e in entries}))
        out.update(auroc=auroc, auprc=sum(auprcs) / len(auprcs) if auprcs else None,
                   cases=sum(int(e["cases"]) for e in entries), measured_on=data, phantom=phantom,
                   grade=_grade(auroc))
        pair = [e for e in entries if source_modality is not None and e["source_modality"] == source_modality]
        where = ("on synthetic phantoms, not on patient scans" if phantom else
                 f"on {data}" + ("" if pair else " (another modality pair than this model's)"))
        out["text"] = (f"The '{map_name}' overlay marks where {who} is likely wrong. Measured {where}, it "
                       f"ranked a wrong voxel above a correct one {round(auroc * 100)} times in 100 "
                       f"(voxel AUROC {auroc:.2f}; 0.5 is chance, 1.0 perfect): {_grade(auroc)}. Use it to "
                       "decide where to look first; a dark region is not proof that the segmentation "
                       "is right there.")
        if phantom:
            out["warnings"].append("This figure comes from synthetic phantoms; on patient scans it can be "
                                   "lower.")
        if auroc < MISLEADING_AUROC:
            out["warnings"].append(f"The '{map_name}' overlay found {who}'s errors barely better than chance "
                                   f"(AUROC {auroc:.2f}); do not rely on it.")
        out["warnings"].extend(f"Known to mislead: {e['note']}" for e in entries
                               if e.get("misleading") and e.get("note"))
    else:
        out["text"] = (f"The '{map_name}' overlay marks where {who} may be wrong. How well it finds the "
                       "errors has not been measured for this method; treat it as a rough guide.")
    if (method, map_name) in KNOWN_MISLEADING:
        out["warnings"].insert(0, f"Known to mislead: {KNOWN_MISLEADING[(method, map_name)]}. Do not "
                                  "read low values as correct.")
    return out
