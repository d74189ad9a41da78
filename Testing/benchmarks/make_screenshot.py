"""Render the extension's screenshot from the files of a real run (not from the application).

Until a screenshot of the Slicer panel exists, the extension's screenshot
(``Screenshots/gmm_phantom_review.png``, named in ``CMakeLists.txt``) shows what the panel shows
in the slice views, drawn from a run's output folder the way the module sets up the views
(``slicer_bridge/overlay_display.py``): the scan in grey, the uncertainty map over it in the
Inferno colours and transparent below a fraction of its range, the segmentation as outlines in
the class colours, and a colour legend. The picture says in its caption that it was rendered
from files.

Make the run, then the picture::

    python -m SFUDASegmentLib.cli adapt --method gmm \\
        --checkpoint Resources/SampleData/phantom_demo.sfuda \\
        --image Resources/SampleData/phantom_target.nrrd --out /tmp/gmm_run
    python Testing/benchmarks/make_screenshot.py --run /tmp/gmm_run \\
        --out Screenshots/gmm_phantom_review.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from SFUDASegmentLib.data.io import read_image
from SFUDASegmentLib.slicer_bridge.overlay_display import DEFAULT_HIDE_BELOW

SCALE = 4
LEGEND_WIDTH = 90
CAPTION_HEIGHT = 58


def _grey(image: np.ndarray) -> np.ndarray:
    """A slice as 0..1 grey with a 1-99 % percentile window, ``(y, x)`` -> ``(y, x, 3)``."""
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-9), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=2)


def _inferno(fraction: np.ndarray) -> np.ndarray:
    """Inferno colours (BGR, 0..1) of values in [0, 1], ``(...)`` -> ``(..., 3)``."""
    codes = np.clip(fraction * 255, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(codes.reshape(-1, 1), cv2.COLORMAP_INFERNO).reshape(
        *fraction.shape, 3).astype(np.float32) / 255.0


def render_slice(image: np.ndarray, labels: np.ndarray, values: np.ndarray, low: float, high: float,
                 hide_below: float, opacity: float, colours: dict[int, tuple]) -> np.ndarray:
    """One slice as the review shows it, enlarged ``SCALE`` times, BGR uint8."""
    base = _grey(image)
    fraction = (values - low) / max(high - low, 1e-12)
    shown = (fraction >= hide_below)[..., None]
    blended = np.where(shown, (1 - opacity) * base + opacity * _inferno(fraction), base)
    big = cv2.resize((blended * 255).astype(np.uint8), None, fx=SCALE, fy=SCALE,
                     interpolation=cv2.INTER_NEAREST)
    for value, rgb in colours.items():
        mask = cv2.resize((labels == value).astype(np.uint8), None, fx=SCALE, fy=SCALE,
                          interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        bgr = tuple(int(255 * c) for c in reversed(rgb[:3]))
        cv2.drawContours(big, contours, -1, bgr, 2)
    return big


def legend(height: int, low: float, high: float, title: str) -> np.ndarray:
    """A vertical colour bar from ``low`` (bottom) to ``high`` (top), BGR uint8."""
    panel = np.full((height, LEGEND_WIDTH, 3), 255, np.uint8)
    bar = _inferno(np.linspace(1.0, 0.0, height - 40)[:, None].repeat(18, axis=1))
    panel[20:height - 20, 8:26] = (bar * 255).astype(np.uint8)
    for text, y in ((f"{high:.2f}", 30), (f"{low:.2f}", height - 22)):
        cv2.putText(panel, text, (30, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(panel, title, (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
    return panel


def render(run: Path, map_name: str, slices: int, hide_below: float, opacity: float) -> np.ndarray:
    """The screenshot of a run folder: the ``slices`` axial slices with the most foreground.
    The scan is the run's input (``report.json``'s path, relative to the current folder)."""
    report = json.loads((run / "report.json").read_text())
    image = read_image(report["input"]).array
    labels = read_image(run / "segmentation.nii.gz").array
    values = read_image(run / f"{map_name}.nii.gz").array.astype(np.float32)
    colours = {int(c["value"]): tuple(c["color"]) for c in report["classes"]}
    low, high = float(values.min()), float(values.max())
    order = np.argsort(-(labels > 0).sum(axis=(1, 2)), kind="stable")[:slices]
    tiles = [render_slice(image[z], labels[z], values[z], low, high, hide_below, opacity, colours)
             for z in sorted(order)]
    row = np.concatenate([np.pad(t, ((0, 0), (0, 6), (0, 0)), constant_values=255) for t in tiles], axis=1)
    row = np.concatenate([row, legend(row.shape[0], low, high, map_name.replace("_", " "))], axis=1)
    caption = np.full((CAPTION_HEIGHT, row.shape[1], 3), 255, np.uint8)
    lines = (f"Rendered from the output files of `sfuda adapt --method {report['method']}` on the "
             "bundled phantom - not a screenshot of Slicer.",
             f"Scan (grey), {map_name.replace('_', ' ')} transparent below {hide_below:.0%} of its "
             f"range, axial slices {', '.join(str(int(z)) for z in sorted(order))}. Outlines:")
    font = cv2.FONT_HERSHEY_SIMPLEX
    for index, line in enumerate(lines):
        cv2.putText(caption, line, (6, 22 + 24 * index), font, 0.45, (0, 0, 0), 1)
    x = 12 + cv2.getTextSize(lines[1], font, 0.45, 1)[0][0]
    for c in report["classes"]:
        bgr = tuple(int(255 * v) for v in reversed(c["color"][:3]))
        cv2.rectangle(caption, (x, 35), (x + 10, 45), bgr, -1)
        cv2.putText(caption, c["name"], (x + 14, 46), font, 0.45, (0, 0, 0), 1)
        x += 24 + cv2.getTextSize(c["name"], font, 0.45, 1)[0][0]
    return np.concatenate([row, caption], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="output folder of `sfuda adapt`")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--map", default="entropy", help="uncertainty map shown (entropy, nig_variance)")
    parser.add_argument("--slices", type=int, default=3, help="number of axial slices")
    parser.add_argument("--hide-below", type=float, default=DEFAULT_HIDE_BELOW,
                        help="fraction of the map's range below which it is transparent")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity")
    args = parser.parse_args()
    picture = render(Path(args.run), args.map, args.slices, args.hide_below, args.opacity)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(args.out, picture):
        raise SystemExit(f"could not write {args.out}")
    print(f"{args.out}: {picture.shape[1]}x{picture.shape[0]} pixels")


if __name__ == "__main__":
    main()
