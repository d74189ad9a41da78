"""Development benchmark of adaptation on real scans: the ten expert-labelled BraTS 2018 cases of
../shared/data/brats2018, in the HEAL paper's directions T2 -> FLAIR and T1 -> T1ce, and T1ce ->
FLAIR.

The cases are split into folds; for each fold a 2D source model (with its diffusion model and GMM
prototypes) is trained on the source modality of the cases *outside* the fold and evaluated on
the target modality of the cases *inside* it, so every case is a target once and no model sees
the patient it is evaluated on. Per direction it prints: every method's Dice and ASD (WT, TC,
ET) with the paired difference to no adaptation (95 % t interval, gains/losses); the same on the
source modality of the same cases (the control: nothing to adapt); an upper bound trained the
same way on the target modality; the audit of the source model's errors (false positives and
negatives, the share HEAL's entropy stage can see, the remove-every-false-positive oracle, the
diffusion round trip); and how well label-free signals separate the cases GMM made worse.

CPU recipe (2 mm grid, small diffusion network; the models are cached in the work folder, and
each case's figures too, so a second run only prints):

    python Testing/benchmarks/bench_brats.py --workdir /tmp/brats_bench

GPU recipe (1 mm grid, the training budgets of a real run; for a lent GPU machine):

    python Testing/benchmarks/bench_brats.py --workdir /tmp/brats_gpu --recipe gpu --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brats_cases import DEFAULT_DATA, case_names, folds, load_case  # noqa: E402
from brats_methods import Settings, run_case  # noqa: E402
from brats_models import CPU_RECIPE, GPU_RECIPE, load_or_train  # noqa: E402
from brats_report import (audit_summary, guard_outcome, print_audit, print_per_case, print_summary,  # noqa: E402
                          separation, summary_rows)

DIRECTIONS = ("t2:flair", "t1:t1ce", "t1ce:flair")
PER_CASE_ROWS = ("none", "Y* (paper HD)", "comp(Y_ent, class)", "comp(Y_ent, tumour)", "HEAL (paper)",
                 "HEAL (components)", "GMM", "target-trained (upper bound)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the brats2018 folder")
    parser.add_argument("--workdir", required=True, help="cached models and per-case figures")
    parser.add_argument("--recipe", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--fold", type=int, action="append",
                        help="run only this fold (repeat for several; e.g. one fold per machine); the tables "
                             "then hold its cases")
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), help="source:target modalities")
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--gmm-iterations", type=int, default=100)
    parser.add_argument("--no-heal-full", action="store_true", help="skip the diffusion rows (denoising only)")
    parser.add_argument("--control-heal-full", action="store_true",
                        help="also run the diffusion rows on the source-modality control scans")
    parser.add_argument("--round-trip-cases", type=int, default=1,
                        help="cases per fold and direction whose diffusion round trip is audited")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="write every figure here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = CPU_RECIPE if args.recipe == "cpu" else GPU_RECIPE
    workdir = Path(args.workdir)
    data = Path(args.data)
    names = case_names(data)
    started = time.perf_counter()
    cases = {n: load_case(data, n, recipe.spacing) for n in names}
    directions = [tuple(d.split(":")) for d in args.directions]
    sources = {s for s, _ in directions}
    needed = sources | {t for _, t in directions}
    target_folds = folds(names, args.folds)
    records: dict[str, list] = {d: [] for d in args.directions}
    train_seconds = 0.0
    for f, fold in enumerate(target_folds):
        if args.fold is not None and f not in args.fold:
            continue
        train_cases = [cases[n] for n in names if n not in fold]
        models = {}
        for modality in sorted(needed):
            t = time.perf_counter()
            models[modality] = load_or_train(workdir, f, modality, train_cases, recipe, modality in sources,
                                             args.device)
            train_seconds += time.perf_counter() - t
        for direction, (source, target) in zip(args.directions, directions):
            for i, name in enumerate(fold):
                path = workdir / "results" / f"{source}_to_{target}" / f"{name}.json"
                if path.is_file():
                    records[direction].append(json.loads(path.read_text()))
                    continue
                settings = Settings(args.candidates, args.sampler, args.steps, args.gmm_iterations, args.device,
                                    heal_full=not args.no_heal_full, control_heal_full=args.control_heal_full,
                                    round_trip=i < args.round_trip_cases and not args.no_heal_full)
                t = time.perf_counter()
                record = run_case(cases[name], source, target, models[source], models[target], settings)
                record["seconds"]["total"] = time.perf_counter() - t
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record))
                records[direction].append(record)
                print(f"fold {f} {source}->{target} {name}: none {record['target']['none']['mean_dice']:.3f}, "
                      f"{record['seconds']['total']:.0f} s", flush=True)
    figures: dict = {"recipe": recipe.__dict__, "folds": target_folds, "directions": {}}
    for direction, (source, target) in zip(args.directions, directions):
        recs = sorted(records[direction], key=lambda r: r["case"])
        target_rows, control_rows = summary_rows(recs, "target"), summary_rows(recs, "control")
        label = f"{source.upper()} -> {target.upper()}"
        print_summary(f"== {label}: target {target.upper()} of patients the source model never saw "
                      f"({len(recs)} cases, Dice x100, ASD mm)", target_rows)
        print_summary(f"== {label}: control, the same cases' {source.upper()} (nothing to adapt)", control_rows)
        print_per_case(f"== {label}: mean Dice x100 per case", target_rows, PER_CASE_ROWS)
        audit = audit_summary(recs)
        print_audit(f"== {label}: audit of the source model's errors on {target.upper()}", audit, target_rows)
        separations = {key: separation(recs, key, row, section)
                       for key, row, section in (("GMM", "GMM", "target"), ("GMM (control)", "GMM", "control"))}
        figures["directions"][direction] = {"target": target_rows, "control": control_rows, "audit": audit,
                                            "separation": separations}
    all_records = [r for d in args.directions for r in records[d]]
    print("\n== Label-free signals vs the cases GMM made worse (all directions, AUROC; 0.5 = chance)")
    gmm_separation = separation(all_records, "GMM", "GMM")
    for signal, s in sorted(gmm_separation.items(), key=lambda kv: -abs(kv[1]["auroc"] - 0.5)):
        print(f"  {signal:26s} {s['auroc']:.2f}  ({s['losses']} losses, {s['gains']} gains)")
    figures["gmm_separation"] = gmm_separation
    figures["gmm_guard"] = {threshold: guard_outcome(all_records, "GMM", "GMM", "foreground_agreement", threshold, True)
                            for threshold in (0.5, 0.6, 0.7, 0.8, 0.9)}
    print("\n== Rule 'keep the source prediction when GMM's whole tumour agrees with it below t' (all directions)")
    for threshold, outcome in figures["gmm_guard"].items():
        print(f"  t = {threshold:.1f}: fires on {outcome['fired']}, losses avoided {outcome['losses_avoided']}, "
              f"gains given up {outcome['gains_given_up']}, mean Dice {outcome['mean_dice_unguarded'] * 100:.1f} -> "
              f"{outcome['mean_dice'] * 100:.1f} (none {outcome['mean_dice_none'] * 100:.1f})")
    figures["seconds"] = {"total": time.perf_counter() - started, "training_and_loading": train_seconds}
    print(f"\n{time.perf_counter() - started:.0f} s in all ({train_seconds:.0f} s training or loading models)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
