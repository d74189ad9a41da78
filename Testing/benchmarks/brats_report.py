"""Tables of the development benchmark: per direction the mean Dice and ASD of every row with
the paired difference to no adaptation, the per-case mean Dice, the audit of the source model's
errors, and how well each label-free signal separates the cases an adaptation made worse."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from brats_cases import REGIONS

from SFUDASegmentLib.evaluation.paired import paired_difference

BASELINE = "none"


def _order(records: Sequence[dict[str, Any]], section: str) -> list[str]:
    """Row names in first-seen order, present in every record."""
    names: list[str] = []
    for record in records:
        for name in record[section]:
            if name not in names:
                names.append(name)
    return [n for n in names if all(n in r[section] for r in records)]


def _finite_mean(values: Iterable[float]) -> tuple[float, int]:
    """Mean of the finite values and how many were infinite (one mask empty)."""
    values = list(values)
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(values) - len(finite)


def summary_rows(records: Sequence[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    """Per row: mean Dice per region and overall, mean ASD (finite cases), the paired difference
    of the mean Dice to ``none`` (95 % t interval) and the per-case mean Dice."""
    baseline = [r[section][BASELINE]["mean_dice"] for r in records]
    rows = []
    for name in _order(records, section):
        scores = [r[section][name] for r in records]
        row: dict[str, Any] = {"method": name, "cases": [r["case"] for r in records],
                               "mean_dice_per_case": [s["mean_dice"] for s in scores]}
        for region in REGIONS:
            row[f"{region}_dice"] = float(np.mean([s[f"{region}_dice"] for s in scores]))
            row[f"{region}_asd"], row[f"{region}_asd_empty"] = _finite_mean(s[f"{region}_asd"] for s in scores)
        row["mean_dice"] = float(np.mean(row["mean_dice_per_case"]))
        diff = paired_difference(row["mean_dice_per_case"], baseline)
        row["difference"] = {"mean": diff.mean, "low": diff.low, "high": diff.high, "gains": diff.gains,
                             "losses": diff.losses}
        rows.append(row)
    return rows


def print_summary(title: str, rows: Sequence[dict[str, Any]]) -> None:
    """Dice x100 per region, ASD in mm, and the paired difference to no adaptation."""
    print(f"\n{title}")
    print(f"{'method':30s} {'WT':>5s} {'TC':>5s} {'ET':>5s} {'mean':>5s} | {'ASD WT':>6s} {'TC':>6s} {'ET':>6s} | "
          f"{'mean - none [95% CI]':>24s}  gains/losses")
    for row in rows:
        d = row["difference"]
        asd = " ".join(f"{row[f'{r}_asd']:6.1f}" + ("*" if row[f"{r}_asd_empty"] else " ") for r in REGIONS)
        interval = ("" if row["method"] == BASELINE else
                    f"{d['mean'] * 100:+5.1f} [{d['low'] * 100:+5.1f}, {d['high'] * 100:+5.1f}]")
        counts = "" if row["method"] == BASELINE else f"{d['gains']}/{d['losses']}"
        print(f"{row['method']:30s} {row['WT_dice'] * 100:5.1f} {row['TC_dice'] * 100:5.1f} "
              f"{row['ET_dice'] * 100:5.1f} {row['mean_dice'] * 100:5.1f} |{asd}| {interval:>24s}  {counts}")
    print("(* ASD mean over the cases where both masks are non-empty; some cases had an empty mask)")


def print_per_case(title: str, rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> None:
    """Mean Dice x100 of chosen rows, a line per case."""
    chosen = [r for r in rows if r["method"] in methods]
    print(f"\n{title}")
    print(f"{'case':24s} " + " ".join(f"{r['method'][:16]:>16s}" for r in chosen))
    for i, case in enumerate(chosen[0]["cases"]):
        print(f"{case:24s} " + " ".join(f"{r['mean_dice_per_case'][i] * 100:16.1f}" for r in chosen))


def audit_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Summed FP / FN voxels and voxel-weighted uncertain shares per class and WT."""
    out: dict[str, dict[str, float]] = {}
    for name in records[0]["audit"]:
        entries = [r["audit"][name] for r in records]
        fp, fn = sum(e["fp"] for e in entries), sum(e["fn"] for e in entries)
        out[name] = {"fp": fp, "fn": fn,
                     "fp_uncertain": sum(e["fp"] * e["fp_uncertain_share"] for e in entries if e["fp"]) / max(fp, 1),
                     "fn_uncertain": sum(e["fn"] * e["fn_uncertain_share"] for e in entries if e["fn"]) / max(fn, 1)}
    return out


def print_audit(title: str, audit: dict[str, dict[str, float]], rows: Sequence[dict[str, Any]]) -> None:
    """The audit table and the rows that bound what denoising and rendering can do."""
    print(f"\n{title}")
    print(f"{'class':12s} {'FP voxels':>10s} {'FN voxels':>10s} {'FP with H>tau1':>15s} {'FN with H>tau1':>15s}")
    for name, a in audit.items():
        print(f"{name:12s} {a['fp']:10d} {a['fn']:10d} {a['fp_uncertain'] * 100:14.1f}% {a['fn_uncertain'] * 100:14.1f}%")
    by_name = {r["method"]: r for r in rows}
    for name in ("none", "oracle: every FP removed", "M_S(D(ground truth))", "M_S(D(Y_T))"):
        if name in by_name:
            r = by_name[name]
            print(f"  {name:28s} mean Dice {r['mean_dice'] * 100:5.1f} (WT {r['WT_dice'] * 100:.1f}, "
                  f"TC {r['TC_dice'] * 100:.1f}, ET {r['ET_dice'] * 100:.1f})")


def separation(records: Sequence[dict[str, Any]], key: str, row: str, section: str = "target") -> dict[str, dict]:
    """How well each label-free signal (``record["signals"][key]``) separates the cases where
    ``row`` of ``section`` is worse than no adaptation.

    A case is a *loss* when the row's mean Dice is below no adaptation's. For every signal the
    AUROC of "signal ranks losses above gains" (Mann-Whitney U / (n_loss * n_gain)); 0.5 is
    chance, values far from 0.5 in either direction separate.

    Returns:
        ``{signal: {"auroc", "losses", "gains"}}`` (empty when all cases are losses or gains).
    """
    deltas = np.array([r[section][row]["mean_dice"] - r[section][BASELINE]["mean_dice"] for r in records])
    loss = deltas < 0
    if loss.all() or not loss.any():
        return {}
    out = {}
    for signal in records[0]["signals"][key]:
        values = np.array([r["signals"][key][signal] for r in records], dtype=np.float64)
        if signal == "seconds" or not np.all(np.isfinite(values)):
            continue
        u = mannwhitneyu(values[loss], values[~loss]).statistic
        out[signal] = {"auroc": float(u / (loss.sum() * (~loss).sum())), "losses": int(loss.sum()),
                       "gains": int((~loss).sum())}
    return out


def guard_outcome(records: Sequence[dict[str, Any]], key: str, row: str, signal: str, threshold: float,
                  keep_source_below: bool, section: str = "target") -> dict[str, Any]:
    """What the rule "keep the source prediction when ``signal`` is below (``keep_source_below``)
    or above ``threshold``" does to ``row``: how often it fires, losses avoided, gains given up,
    and the mean Dice with and without it."""
    avoided = forfeited = fired = 0
    guarded, unguarded, baseline = [], [], []
    for r in records:
        value = r["signals"][key][signal]
        fires = value < threshold if keep_source_below else value > threshold
        delta = r[section][row]["mean_dice"] - r[section][BASELINE]["mean_dice"]
        fired += int(fires)
        avoided += int(fires and delta < 0)
        forfeited += int(fires and delta > 0)
        unguarded.append(r[section][row]["mean_dice"])
        baseline.append(r[section][BASELINE]["mean_dice"])
        guarded.append(baseline[-1] if fires else unguarded[-1])
    return {"fired": fired, "losses_avoided": avoided, "gains_given_up": forfeited,
            "mean_dice": float(np.mean(guarded)), "mean_dice_unguarded": float(np.mean(unguarded)),
            "mean_dice_none": float(np.mean(baseline))}
