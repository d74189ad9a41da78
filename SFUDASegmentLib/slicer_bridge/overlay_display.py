"""How a result is shown for review: uncertainty over the scan, the segmentation's outline above.

- The uncertainty map is the slice views' foreground layer. Voxels below a threshold the user
  moves (a fraction of the map's range) are transparent, so the scan shows through wherever the
  model is confident and only the doubtful regions are coloured (the display node's threshold:
  Slicer draws voxels outside ``[lower, upper]`` with zero alpha).
- A colour legend (Slicer's colour legend display node) shows what the colours mean.
- The segmentation is drawn as an outline without fill, above the overlay (segmentations are
  drawn above the volume layers), so the overlay under it stays readable.

Everything that touches Slicer imports it inside the function (see ``mrml.py``).
"""

from __future__ import annotations

from typing import Any, Optional

#: Default fraction of a map's range below which it is transparent.
DEFAULT_HIDE_BELOW = 0.1

#: Outline width in the slice views, in pixels.
OUTLINE_THICKNESS = 2


def map_range(map_node: Any) -> tuple[float, float]:
    """``(low, high)`` of a map volume's voxels (``high > low``)."""
    low, high = (float(v) for v in map_node.GetImageData().GetScalarRange())
    return low, max(high, low + 1e-6)


def set_transparent_below(map_node: Any, fraction: float) -> float:
    """Make a map transparent where it is below ``low + fraction * (high - low)``.

    Args:
        map_node: a scalar volume (entropy, NIG variance...).
        fraction: in ``[0, 1]``; 0 shows every voxel.

    Returns:
        The threshold in the map's units.
    """
    low, high = map_range(map_node)
    fraction = min(1.0, max(0.0, float(fraction)))
    threshold = low + fraction * (high - low)
    display = map_node.GetDisplayNode()
    display.SetAutoThreshold(0)
    display.SetThreshold(threshold, high)
    display.SetApplyThreshold(1)
    return threshold


def legend_of(map_node: Any) -> Optional[Any]:
    """The colour legend display node of a map, None when it has none."""
    for index in range(map_node.GetNumberOfDisplayNodes()):
        display = map_node.GetNthDisplayNode(index)
        if display is not None and display.IsA("vtkMRMLColorLegendDisplayNode"):
            return display
    return None


def show_legend(map_node: Any, title: str, visible: bool = True) -> Any:
    """Show (creating it once) the colour legend of a map in the views, titled ``title``.

    Returns:
        The ``vtkMRMLColorLegendDisplayNode``.
    """
    import slicer

    legend = legend_of(map_node)
    if legend is None:
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(map_node)
    legend.SetTitleText(title)
    legend.SetLabelFormat("%.2g")
    legend.SetVisibility(bool(visible))
    return legend


def show_outline_only(segmentation_node: Any) -> None:
    """Draw a segmentation as an opaque outline without fill in the slice views."""
    display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DOutline(1.0)
    display.SetVisibility2DFill(False)
    display.SetSliceIntersectionThickness(OUTLINE_THICKNESS)


def show_review(input_node: Any, overlay_node: Any = None, segmentation_node: Any = None,
                opacity: float = 0.5, hide_below: float = DEFAULT_HIDE_BELOW,
                legend_title: str = "", other_maps: tuple = ()) -> None:
    """Set up the slice views for review.

    Args:
        input_node: the scan, as background.
        overlay_node: the map (or candidate image) shown as foreground at ``opacity``; a map is
            made transparent below ``hide_below`` (fraction of its range) and gets a legend.
            A candidate image (``legend_title`` empty) is shown whole, without legend.
        segmentation_node: drawn as an outline above the overlay.
        opacity: foreground opacity.
        hide_below: see :func:`set_transparent_below`.
        legend_title: the legend's title; empty for no legend.
        other_maps: the run's other maps, whose legends are hidden.

    Without slice views (the slicer-core wheel) only the nodes' display settings change.
    """
    import slicer

    for other in other_maps:
        if other is not None and other is not overlay_node and legend_of(other) is not None:
            legend_of(other).SetVisibility(False)
    if overlay_node is not None and legend_title:
        set_transparent_below(overlay_node, hide_below)
        show_legend(overlay_node, legend_title)
    if segmentation_node is not None:
        show_outline_only(segmentation_node)
    slicer.util.setSliceViewerLayers(background=input_node, foreground=overlay_node,
                                      foregroundOpacity=float(opacity))
