"""The review queue in the scene: a table node of the regions to check, and a jump of every
slice view to a chosen region.

A queue is ``Result.review_queue`` (or ``report.json``'s ``review_queue``): one dict per region
with ``center_ras`` in mm (see ``uncertainty/review_queue.py``). A 2D result sits on a
one-slice volume at S = 0 (the bridge's convention, see ``mrml.py``), so its centre gets S = 0.

Like ``mrml.py``, this module imports ``slicer`` and ``vtk`` only inside its functions; it runs in
Slicer and on a slicer-core scene (``Testing/mrml_scene.py``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import InputError
from .mrml import _scene_or_default, _slicer, add_table_node

#: Columns of the centre in the table node (RAS, mm).
CENTER_COLUMNS = ("center_R", "center_A", "center_S")


def region_center_ras(region: Mapping[str, Any]) -> tuple[float, float, float]:
    """The RAS centre of one queue entry, 3 values (S = 0 for a 2D result).

    Raises:
        InputError: the entry has no ``center_ras`` of 2 or 3 numbers.
    """
    center = region.get("center_ras")
    if not isinstance(center, Sequence) or len(center) not in (2, 3):
        raise InputError(f"Review region {region.get('rank', '?')} has no centre (center_ras with 2 or 3 "
                         "values); rebuild the queue with the current library.")
    values = [float(v) for v in center]
    return (values[0], values[1], values[2] if len(values) == 3 else 0.0)


def add_review_queue_table(queue: Sequence[Mapping[str, Any]], name: str, scene: Any = None) -> Any:
    """Add the queue as a table node: one row per region, best first.

    Columns: ``rank``, ``structure``, ``volume_ml`` (3D) or ``area_mm2`` (2D), ``uncertainty_mass``,
    ``mean_uncertainty``, ``max_uncertainty``, ``center_R``, ``center_A``, ``center_S``. An empty
    queue gives a table with these columns and no row.

    Returns:
        The new ``vtkMRMLTableNode``.
    """
    size = "area_mm2" if queue and "area_mm2" in queue[0] else "volume_ml"
    columns = ("rank", "structure", size, "uncertainty_mass", "mean_uncertainty", "max_uncertainty")
    rows = [{**{c: region.get(c) for c in columns}, **dict(zip(CENTER_COLUMNS, region_center_ras(region)))}
            for region in queue]
    if rows:
        return add_table_node(rows, name, scene)
    node = add_table_node([{c: 0.0 for c in (*columns, *CENTER_COLUMNS)}], name, scene)
    node.GetTable().SetNumberOfRows(0)
    return node


def table_row_center_ras(table_node: Any, row: int) -> tuple[float, float, float]:
    """The RAS centre stored in ``row`` of a table made by :func:`add_review_queue_table`.

    Raises:
        InputError: no such row, or a table without the centre columns.
    """
    table = table_node.GetTable()
    if not 0 <= int(row) < table.GetNumberOfRows():
        raise InputError(f"The review table has {table.GetNumberOfRows()} row(s); row {row} does not exist.")
    values = []
    for column in CENTER_COLUMNS:
        array = table.GetColumnByName(column)
        if array is None:
            raise InputError(f"'{table_node.GetName()}' is not a review-queue table (no column {column}).")
        values.append(float(array.GetValue(int(row))))
    return values[0], values[1], values[2]


def jump_slices_to(center_ras: Sequence[float], scene: Any = None, input_node: Any = None,
                   centered: bool = True) -> tuple[float, float, float]:
    """Move every slice view of the scene to a point (``vtkMRMLSliceNode.JumpAllSlices``).

    Args:
        center_ras: the point in the input volume's RAS space (mm).
        scene: the scene (default ``slicer.mrmlScene``).
        input_node: the volume the result belongs to; when it has a parent transform the point
            is moved with it into world space, where the views are.
        centered: centre the point in each view (else only move the slices through it).

    Returns:
        The world RAS point jumped to. Each slice's offset is then its normal dotted with it.
    """
    slicer = _slicer()
    scene = _scene_or_default(scene)
    point = tuple(float(v) for v in center_ras)
    transform_id = input_node.GetTransformNodeID() if input_node is not None else None
    if transform_id:
        import vtk

        to_world = vtk.vtkGeneralTransform()
        scene.GetNodeByID(transform_id).GetTransformToWorld(to_world)
        point = tuple(to_world.TransformPoint(point))
    mode = slicer.vtkMRMLSliceNode.CenteredJumpSlice if centered else slicer.vtkMRMLSliceNode.OffsetJumpSlice
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *point, mode)
    return point


def jump_slices_to_row(table_node: Any, row: int, input_node: Any = None,
                       centered: bool = True) -> tuple[float, float, float]:
    """Jump every slice view of the table's scene to the region in ``row`` (what a click on a
    row of the review table does)."""
    scene = table_node.GetScene()
    if scene is None:
        raise InputError("The review table is not in a scene.")
    return jump_slices_to(table_row_center_ras(table_node, row), scene, input_node, centered)


def jump_slices_to_region(region: Mapping[str, Any], scene: Any = None, input_node: Any = None,
                          centered: bool = True) -> tuple[float, float, float]:
    """Jump every slice view to one queue entry's centre."""
    return jump_slices_to(region_center_ras(region), scene, input_node, centered)
