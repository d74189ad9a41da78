"""The reviewer's picture of GMM adaptation: target embeddings before and after adaptation
against the class prototypes, on the prototypes' first two principal axes (a PNG via OpenCV)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..results.result import Result

_PANEL = 360
_MARGIN = 30


def _colour(rgb: tuple[float, float, float]) -> tuple[int, int, int]:
    """RGB 0-1 -> OpenCV BGR 0-255."""
    return int(rgb[2] * 255), int(rgb[1] * 255), int(rgb[0] * 255)


def render_embedding_plot(pca: dict, class_colours: list[tuple[float, float, float]]) -> np.ndarray:
    """Two panels (before | after): prototype samples coloured by class, target embeddings in black.

    Args:
        pca: ``GMMAdaptation.embedding_pca`` (``prototypes`` [x, y, class], ``before``/``after`` [x, y]).
        class_colours: RGB (0-1) per network class index (background first).

    Returns:
        ``(H, W, 3)`` uint8 BGR image.
    """
    proto = np.asarray(pca["prototypes"], dtype=float).reshape(-1, 3)
    before = np.asarray(pca["before"], dtype=float).reshape(-1, 2)
    after = np.asarray(pca["after"], dtype=float).reshape(-1, 2)
    every = np.concatenate([proto[:, :2], before, after])
    lo, hi = np.percentile(every, 1, axis=0), np.percentile(every, 99, axis=0)
    span = np.maximum(hi - lo, 1e-9)
    canvas = np.full((_PANEL + 2 * _MARGIN, 2 * _PANEL + 3 * _MARGIN, 3), 255, np.uint8)

    def to_pixel(points: np.ndarray, panel: int) -> np.ndarray:
        unit = np.clip((points - lo) / span, 0, 1)
        x = _MARGIN + panel * (_PANEL + _MARGIN) + unit[:, 0] * _PANEL
        y = _MARGIN + (1 - unit[:, 1]) * _PANEL
        return np.stack([x, y], 1).astype(int)

    for panel, (title, target) in enumerate((("before adaptation", before), ("after adaptation", after))):
        x0 = _MARGIN + panel * (_PANEL + _MARGIN)
        cv2.rectangle(canvas, (x0, _MARGIN), (x0 + _PANEL, _MARGIN + _PANEL), (200, 200, 200), 1)
        for (x, y), c in zip(to_pixel(proto[:, :2], panel), proto[:, 2].astype(int)):
            colour = class_colours[c] if c < len(class_colours) else (0.5, 0.5, 0.5)
            cv2.circle(canvas, (int(x), int(y)), 2, _colour(colour), -1)
        for x, y in to_pixel(target, panel):
            cv2.drawMarker(canvas, (int(x), int(y)), (0, 0, 0), cv2.MARKER_CROSS, 5, 1)
        cv2.putText(canvas, title, (x0, _MARGIN - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(canvas, "dots: prototype samples by class   crosses: target embeddings (PCA of prototypes)",
                (_MARGIN, canvas.shape[0] - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (60, 60, 60), 1)
    return canvas


def write_embedding_plot(result: Result, path: str | Path) -> Path:
    """Write the before/after embedding plot of a GMM result as a PNG."""
    colours = [(0.6, 0.6, 0.6)] + [c.color for c in result.classes]
    image = render_embedding_plot(result.extra["embedding_pca"], colours)
    path = Path(path)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"Could not write {path}")
    return path
