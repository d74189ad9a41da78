"""Adaptation of a cohort of scans: one output folder per scan, the scans split over the
processes that ``torchrun`` starts (one per GPU), a summary written by rank 0.

``sfuda adapt --cohort --image a.nii.gz --image b.nii.gz ... --out results`` adapts every image on
its own, exactly as ``sfuda adapt`` would with that one image, into
``results/case_000_a``, ``results/case_001_b``...; the folder names and every output depend
only on the image's place in the list, never on the number of processes, so
``torchrun --nproc-per-node 4 -m SFUDASegmentLib.cli adapt --cohort ...`` writes the same files as
one process. Process ``r`` of ``N`` takes images ``r, r + N, r + 2N...``. An image that fails
with a readable error is recorded and the others go on; the summary
(``results/cohort.json``, also printed) lists every image with its folder, seconds and status,
and the exit code is 2 when any image failed.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import InputError, OperationCancelled, SFUDAError
from .results.staging import OutputTransaction
from .utils.distributed import DistributedContext, process_group
from .utils.progress import ProgressReporter, report

COHORT_TIMEOUT = datetime.timedelta(hours=24)
"""How long the processes that finished their images wait for the slowest one."""

AdaptOne = Callable[[str, Path], dict[str, Any]]
"""Adapts one image into one folder and returns what to record about it."""


def cohort_folder(out: Path, index: int, image: str) -> Path:
    """The output folder of the ``index``-th image: ``out/case_003_<file name without extension>``."""
    return Path(out) / f"case_{index:03d}_{Path(image).name.split('.')[0]}"


def run_cohort(images: Sequence[str], out: Path, adapt_one: AdaptOne, distributed: DistributedContext,
               progress: Optional[ProgressReporter] = None) -> dict[str, Any]:
    """Adapt this process's share of the images, then gather every record.

    Args:
        images: every image of the cohort, in order.
        out: the cohort's folder (one sub-folder per image; ``cohort.json`` from rank 0).
        adapt_one: adapts one image into a folder; raises :class:`SFUDAError` on failure.
        distributed: which images are this process's.
        progress: stage ``"cohort"``, counted in images of this process.

    Returns:
        The summary, identical on every process: ``images``, ``processes``, ``succeeded``,
        ``failed`` (count), ``seconds`` (wall time of the slowest process) and ``cases`` (one
        record per image, in cohort order: ``index``, ``image``, ``out``, ``rank``,
        ``seconds``, ``status`` ``"ok"`` or ``"failed"``, ``error`` or the image's result).

    Raises:
        OperationCancelled: the user cancelled (nothing more is adapted).
    """
    started = time.perf_counter()
    mine = list(distributed.items(len(images)))
    report(progress, "cohort", 0.0, f"0/{len(mine)} images", done=0, total=len(mine), unit="images")
    records = []
    for n, index in enumerate(mine, start=1):
        folder = cohort_folder(out, index, images[index])
        record: dict[str, Any] = {"index": index, "image": images[index], "out": str(folder),
                                  "rank": distributed.rank}
        begin = time.perf_counter()
        try:
            record.update(status="ok", result=adapt_one(images[index], folder))
        except OperationCancelled:
            raise
        except SFUDAError as error:
            record.update(status="failed", error=f"{type(error).__name__}: {error}")
        record["seconds"] = time.perf_counter() - begin
        records.append(record)
        report(progress, "cohort", n / len(mine), f"{n}/{len(mine)} images", done=n, total=len(mine), unit="images")
    gathered = distributed.gather({"records": records, "seconds": time.perf_counter() - started})
    cases = sorted((r for part in gathered for r in part["records"]), key=lambda r: r["index"])
    failed = sum(r["status"] == "failed" for r in cases)
    summary = {"images": len(images), "processes": distributed.world_size, "succeeded": len(cases) - failed,
               "failed": failed, "seconds": max(part["seconds"] for part in gathered), "cases": cases}
    if distributed.is_main:
        with OutputTransaction(overwrite=True) as summary_file:  # the cohort folder was checked before the work
            summary_file.write_json(summary_file.file(Path(out) / "cohort.json"), summary)
    return summary


def adapt_cohort(args: argparse.Namespace, adapt_command: Callable[..., dict[str, Any]],
                 progress: Optional[ProgressReporter], outputs: OutputTransaction) -> dict[str, Any]:
    """``sfuda adapt --cohort``: the single-image ``adapt`` command on every image of the cohort.

    The cohort folder follows the output rule of every command (never an input, new or empty
    unless ``--overwrite``), checked by every process before any of them writes. Each image's
    folder is its own all-or-nothing output, so a failed image leaves no folder and the others
    stay complete.

    Args:
        args: the parsed ``adapt`` options (``image``: the cohort; ``out``: its folder).
        adapt_command: the CLI's ``adapt`` command; it is called with one image, that image's
            folder and that folder's own output transaction, and returns the image's summary.
        progress: the command's reporter (rank 0 reports, the others run silently).
        outputs: the run's transaction (only its inputs are used: the cohort writes per image).

    Returns:
        The summary (also in ``OUT/cohort.json``), on rank 0; None on the other processes.

    Raises:
        InputError: ``--save-adapted`` with ``--cohort``, or some images failed (after the
            summary was written: it names them).
    """
    from .results.output_guard import check_output, user_entries

    if args.save_adapted:
        raise InputError("--save-adapted cannot be combined with --cohort (every image is adapted on its "
                         "own). Adapt one image with --save-adapted, or drop it.")
    inputs = [args.checkpoint, *args.image]
    outputs.add_inputs(inputs)
    with process_group(args.device, backend="gloo", timeout=COHORT_TIMEOUT) as distributed:
        root = check_output(args.out, "folder", "--out", inputs=inputs, overwrite=args.overwrite)
        distributed.barrier()  # every process checked the folder before any changes it
        if distributed.is_main and args.overwrite and root.is_dir():  # --overwrite replaces the folder whole
            for name in user_entries(root):
                entry = root / name
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        distributed.barrier()
        reporter = progress if distributed.is_main else None

        def adapt_one(image: str, folder: Path) -> dict[str, Any]:
            single = argparse.Namespace(**{**vars(args), "image": [image], "out": str(folder), "cohort": False})
            with OutputTransaction(overwrite=args.overwrite) as own:
                return adapt_command(single, reporter, own)

        summary = run_cohort(list(args.image), Path(args.out), adapt_one, distributed, reporter)
    failed = [r for r in summary["cases"] if r["status"] == "failed"]
    if failed:
        raise InputError(f"{len(failed)} of {summary['images']} images failed ({'; '.join(r['image'] + ': ' + r['error'] for r in failed)}); "
                         f"the others are in '{args.out}', every image's record in '{Path(args.out) / 'cohort.json'}'.")
    return summary if distributed.is_main else None
