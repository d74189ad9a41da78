"""MRML <-> numpy bridge: volume nodes to :class:`Volume`, a :class:`Result` to scene nodes.

Everything that touches Slicer imports ``slicer`` / ``vtk`` inside the function, so this module
imports without Slicer. It runs inside 3D Slicer and, outside it, on a scene built from the
``slicer-core`` wheel (see ``Testing/mrml_scene.py``).

Geometry (the derivation every function here relies on)
-------------------------------------------------------
A Slicer volume node stores, separately, ``Spacing`` ``(sx, sy, sz)``, ``Origin`` (RAS, mm) and
the 3x3 ``IJKToRASDirections`` ``R`` whose column ``c`` is the RAS direction of voxel axis
``c`` (``i`` = x, ``j`` = y, ``k`` = z). A voxel ``(i, j, k)`` sits at

    p_RAS = Origin_RAS + R @ diag(sx, sy, sz) @ (i, j, k)

ITK/SimpleITK (and :class:`Geometry`) use LPS: ``p_LPS = origin + D @ diag(sx, sy, sz) @ (i, j,
k)``. Since ``p_LPS = F @ p_RAS`` with ``F = diag(-1, -1, 1)`` (L = -R, P = -A, S = S):

    origin_LPS = F @ Origin_RAS      (negate x and y)
    D          = F @ R               (negate the first two rows)

and the voxel array from ``arrayFromVolume`` is indexed ``(k, j, i)`` = ``(z, y, x)``, so
:attr:`Geometry.spacing` is ``(sz, sy, sx)``. Negation is exact in floating point and the three
parts are read and written through the node's own spacing/origin/direction accessors (never
through the 4x4 product), so ``volume_from_node(add_volume_node(v)) == v`` holds bit for bit.

A 2D image ``(y, x)`` becomes a one-slice volume ``(1, y, x)``: spacing ``(1, sy, sx)``, origin
``(x0, y0, 0)``, direction ``[[D2, 0], [0, 0, 1]]``. Parent transforms of a node are not part of
its geometry; :func:`add_result_to_scene` places its nodes under the input's transform.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..config import LabelClass
from ..data.geometry import Geometry, Volume
from ..errors import InputError
from ..results.result import Result
from .run_folder import put_in_run_folder, remove_dependents_with_run_nodes, run_folder_name

#: Colour tables tried, in order, after the requested one (procedural tables, always present).
FALLBACK_COLOR_TABLES: tuple[str, ...] = ("Iron", "Rainbow", "Grey")

#: Flip between RAS and LPS (applied to x and y).
_RAS_LPS = np.array([-1.0, -1.0, 1.0])


def _slicer() -> Any:
    """The ``slicer`` module, with a message that says how to get it when it is missing."""
    try:
        import slicer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The MRML bridge needs 3D Slicer or the slicer-core wheel: run it "
                          "in Slicer, or `pip install slicer-core` for a scene outside "
                          "Slicer.") from exc
    return slicer


def _scene_or_default(scene: Any) -> Any:
    """``scene`` or ``slicer.mrmlScene``."""
    if scene is not None:
        return scene
    scene = getattr(_slicer(), "mrmlScene", None)
    if scene is None:
        raise InputError("No MRML scene: pass scene=... or set slicer.mrmlScene (inside Slicer it "
                         "is always set).")
    return scene


def _node_scene(node: Any, what: str) -> Any:
    """The scene that holds ``node``; InputError when the node is not in one."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        raise InputError(f"The {what} is not in an MRML scene: pick a node from the scene "
                         "(or add it with scene.AddNode) and try again.")
    return scene


# ----------------------------------------------------------------------------- geometry


def _as_3d(volume: Volume) -> tuple[np.ndarray, Geometry]:
    """The array and geometry of ``volume`` as a 3D grid (2D images become one slice).

    Returns:
        array ``(z, y, x)``, ``(z, y, x, c)`` (c components per voxel) or ``(1, y, x, 3)``
        (a 2D RGB image), and a 3D :class:`Geometry`.
    """
    array = np.asarray(volume.array)
    geometry = volume.geometry
    if geometry.ndim == 3 and array.ndim in (3, 4):
        return array, geometry
    if geometry.ndim == 2 and array.ndim in (2, 3):
        if array.ndim == 3 and array.shape[2] != 3:
            raise InputError(f"A 2D image must be (y, x) or (y, x, 3) RGB, got {array.shape}: "
                             "pass a 3D geometry for a 3D array.")
        return array[None], _embed_2d(geometry)
    raise InputError(f"Array of shape {array.shape} does not fit a {geometry.ndim}D geometry: "
                     "give (z, y, x) arrays a 3-value spacing and (y, x) images a 2-value one.")


def _embed_2d(geometry: Geometry) -> Geometry:
    """A 2D geometry as the 3D geometry of a one-slice volume (z spacing 1, origin z 0)."""
    d = np.asarray(geometry.direction, dtype=float).reshape(2, 2)
    d3 = np.eye(3)
    d3[:2, :2] = d
    return Geometry(spacing=(1.0, *geometry.spacing), origin=(*geometry.origin, 0.0),
                    direction=tuple(d3.ravel().tolist()))


def _geometry_of_node(node: Any) -> Geometry:
    """The ITK (LPS) geometry of a volume node (see the module docstring)."""
    import vtk

    sx, sy, sz = node.GetSpacing()
    origin_ras = np.asarray(node.GetOrigin(), dtype=float)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(matrix)
    directions_ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    directions_lps = directions_ras * _RAS_LPS[:, None]
    return Geometry(spacing=(sz, sy, sx), origin=tuple((origin_ras * _RAS_LPS).tolist()),
                    direction=tuple(directions_lps.ravel().tolist()))


def _set_node_geometry(node: Any, geometry: Geometry) -> None:
    """Write a 3D ITK (LPS) geometry into a volume node's spacing, origin and directions."""
    import vtk

    sz, sy, sx = geometry.spacing
    node.SetSpacing(sx, sy, sz)
    node.SetOrigin(*(np.asarray(geometry.origin) * _RAS_LPS).tolist())
    directions_ras = np.asarray(geometry.direction, dtype=float).reshape(3, 3) * _RAS_LPS[:, None]
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(directions_ras[r, c]))
    node.SetIJKToRASDirectionMatrix(matrix)


def _vtk_compatible(array: np.ndarray) -> np.ndarray:
    """``array`` in a dtype VTK volumes accept (bool -> uint8, float16 -> float32,
    64-bit integers -> int32 when the values fit; Slicer rejects 'long long' volumes)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype in (np.int64, np.uint64):
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError(f"Integer values {array.min()}..{array.max()} do not fit a 32-bit "
                             "volume: convert the array to float64 first.")
        return array.astype(np.int32)
    return array


def _fill_volume_node(node: Any, array: np.ndarray, geometry: Geometry) -> None:
    """Set a volume node's voxels (deep copy) and geometry; ``array`` is ``(z, y, x[, c])``."""
    slicer = _slicer()
    _set_node_geometry(node, geometry)
    slicer.util.updateVolumeFromArray(node, _vtk_compatible(np.ascontiguousarray(array)))


def _grid_shape(node: Any) -> tuple[int, int, int]:
    """``(z, y, x)`` voxel counts of a volume node."""
    image = node.GetImageData()
    if image is None:
        raise InputError(f"Volume '{node.GetName()}' has no voxels: load or compute the image "
                         "first.")
    nx, ny, nz = image.GetDimensions()
    return nz, ny, nx


def _check_scalar_volume(node: Any) -> None:
    """InputError unless ``node`` is a volume node with one scalar per voxel."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if node is None else node.GetClassName()
        raise InputError(f"Expected a scalar volume node, got {kind}: pick a grey-level volume "
                         "(convert colour images with the 'Vector to Scalar Volume' module).")
    _grid_shape(node)
    components = node.GetImageData().GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(f"Volume '{node.GetName()}' has {components} components per voxel: "
                         "convert it with the 'Vector to Scalar Volume' module first.")


def _on_grid(array: np.ndarray, grid: tuple[int, int, int], what: str) -> np.ndarray:
    """``array`` shaped for a 3D grid: ``(z, y, x[, c])`` as is, a 2D ``(y, x[, c])`` array
    gets a leading slice axis when the grid has one slice. No copy."""
    a = np.asarray(array)
    if a.ndim in (3, 4) and a.shape[:3] == grid:
        return a
    if grid[0] == 1 and a.ndim in (2, 3) and a.shape[:2] == grid[1:]:
        return a[None]
    raise InputError(f"The {what} has shape {a.shape} but the volume grid is {grid} (z, y, x): "
                     "use the volume the result was computed from.")


# ----------------------------------------------------------------------------- volumes


def volume_from_node(node: Any) -> Volume:
    """A copy of a scalar volume node's voxels with its ITK (LPS) geometry.

    Args:
        node: ``vtkMRMLScalarVolumeNode`` (or a label map volume node); not modified.

    Returns:
        :class:`Volume` with array ``(z, y, x)`` (a copy, in the node's dtype) and a 3D
        :class:`Geometry` (spacing ``(sz, sy, sx)``, origin and direction in LPS).

    Raises:
        InputError: not a volume node, a node without voxels, or several components per
            voxel (colour/vector volumes).
    """
    slicer = _slicer()
    _check_scalar_volume(node)
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    return Volume(array=array, geometry=_geometry_of_node(node))


def add_volume_node(volume: Volume, name: str, scene: Any = None,
                    node_class: str = "vtkMRMLScalarVolumeNode") -> Any:
    """Add a new volume node holding ``volume`` with exactly its geometry.

    Args:
        volume: ``(z, y, x)`` with a 3D geometry, or a 2D ``(y, x)`` / RGB ``(y, x, 3)`` image
            with a 2D geometry (stored as one slice). RGB and ``(z, y, x, c)`` arrays become a
            ``vtkMRMLVectorVolumeNode``.
            bool is stored as uint8, float16 as float32, int64 as int32.
        name: wanted node name; made unique in the scene.
        scene: the MRML scene (default ``slicer.mrmlScene``).
        node_class: ``vtkMRMLScalarVolumeNode`` or ``vtkMRMLLabelMapVolumeNode``.

    Returns:
        The new node (with default display nodes). ``volume`` is not modified.
    """
    scene = _scene_or_default(scene)
    array, geometry = _as_3d(volume)
    if array.ndim == 4:
        node_class = "vtkMRMLVectorVolumeNode"
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    try:
        _fill_volume_node(node, array, geometry)
        node.CreateDefaultDisplayNodes()
    except Exception:
        remove_nodes([node])
        raise
    return node


def _find_color_node(scene: Any, names: Sequence[str]) -> Any:
    """The first colour node of the scene whose name is in ``names`` (tried in order)."""
    for name in names:
        found = scene.GetNodesByClassByName("vtkMRMLColorNode", name)
        if found.GetNumberOfItems():
            return found.GetItemAsObject(0)
    return None


def add_map_node(values: np.ndarray, name: str, geometry: Geometry,
                 color_table_name: str = "Rainbow", scene: Any = None) -> Any:
    """Add a float map (entropy, NIG variance, ...) as a coloured scalar volume.

    Args:
        values: ``(z, y, x)`` (or 2D ``(y, x)``) float map on ``geometry``; stored as float32.
        name: wanted node name; made unique.
        geometry: the map's geometry (the input's).
        color_table_name: colour table by name (``"Rainbow"``, ``"Iron"``, ``"PET-Heat"``,
            ``"Inferno"`` in Slicer, ...); when the scene has no table of that name the first of
            :data:`FALLBACK_COLOR_TABLES` that exists is used.
        scene: the MRML scene (default ``slicer.mrmlScene``).

    Returns:
        The new scalar volume node; its display has the colour table and a window/level that
        spans the finite data range (``[lo, hi]``; a constant map gets ``[v, v + 1e-6]``).
    """
    scene = _scene_or_default(scene)
    data = np.asarray(values, dtype=np.float32)
    node = add_volume_node(Volume(data, geometry), name, scene)
    try:
        display = node.GetDisplayNode()
        color = _find_color_node(scene, (color_table_name, *FALLBACK_COLOR_TABLES))
        if color is not None:
            display.SetAndObserveColorNodeID(color.GetID())
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1e-6
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(lo, hi)
    except Exception:
        remove_nodes([node])
        raise
    return node


def add_label_color_table(classes: Sequence[LabelClass], name: str, scene: Any = None) -> Any:
    """Add a colour table with the classes' names and colours at their label values.

    Value 0 is ``"background"`` and, like every value without a class, transparent. Slicer
    keeps the colours at 8 bits per channel.

    Returns:
        The new ``vtkMRMLColorTableNode`` (for label map volume nodes of these classes).
    """
    scene = _scene_or_default(scene)
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", scene.GenerateUniqueName(name))
    node.SetTypeToUser()
    top = max([c.value for c in classes], default=0)
    node.SetNumberOfColors(top + 1)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    by_value = {c.value: c for c in classes}
    for value in range(1, top + 1):
        c = by_value.get(value)
        if c is None:
            node.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
        else:
            node.SetColor(value, c.name, *(float(x) for x in c.color), 1.0)
    return node


# ----------------------------------------------------------------------------- segmentations


def _segment_ids(classes: Sequence[LabelClass]) -> list[str]:
    """Stable segment IDs: the class name, with ``_<value>`` added when names repeat."""
    names = [c.name for c in classes]
    return [c.name if names.count(c.name) == 1 else f"{c.name}_{c.value}" for c in classes]


def add_segmentation_node(labels: np.ndarray, classes: Sequence[LabelClass], reference_node: Any,
                          name: str, terminology: Optional[Mapping[str, str]] = None) -> Any:
    """Add a segmentation node with one segment per class, on the reference volume's grid.

    Args:
        labels: ``(z, y, x)`` label map with the classes' values (0 = background) on the grid
            of ``reference_node`` (a 2D ``(y, x)`` map fits a one-slice volume).
        classes: the foreground classes; every class gets a segment (empty when its value does
            not occur), in this order, named after the class, with its colour; the segment ID is
            the class name (``name_<value>`` if two classes share a name). The segment label
            value (used in ``.seg.nrrd`` files) is the class value.
        reference_node: the volume whose geometry the segmentation uses; not modified.
        name: wanted node name; made unique.
        terminology: class name -> Slicer terminology entry string (see ``terminology.py``);
            the segments of those classes carry it (DICOM SEG export writes its codes).

    Returns:
        The new ``vtkMRMLSegmentationNode``.

    Raises:
        InputError: shape mismatch, or label values that belong to no class.
    """
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support

    scene = _node_scene(reference_node, "reference volume")
    grid = _grid_shape(reference_node)
    labels = _on_grid(labels, grid, "label map")
    if labels.ndim != 3:
        raise InputError(f"A label map must be (z, y, x), got {labels.shape}.")
    unknown = sorted(set(np.unique(labels).tolist()) - {0} - {c.value for c in classes})
    if unknown:
        raise InputError(f"Label values {unknown} belong to no class "
                         f"({[(c.value, c.name) for c in classes]}): add them to the classes or "
                         "set them to 0.")

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    try:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        node.CreateDefaultDisplayNodes()
        ijk_to_ras = vtk.vtkMatrix4x4()
        reference_node.GetIJKToRASMatrix(ijk_to_ras)
        extent = reference_node.GetImageData().GetExtent()
        segmentation = node.GetSegmentation()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        for segment_id, label_class in zip(_segment_ids(classes), classes):
            segmentation.AddEmptySegment(segment_id, label_class.name,
                                         [float(x) for x in label_class.color])
            segment = segmentation.GetSegment(segment_id)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            segment.SetLabelValue(int(label_class.value))
            entry = (terminology or {}).get(label_class.name)
            if entry:
                segment.SetTag(segment.GetTerminologyEntryTagName(), entry)
            mask = slicer.vtkOrientedImageData()
            mask.SetExtent(extent)
            mask.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            mask.SetImageToWorldMatrix(ijk_to_ras)
            voxels = numpy_support.vtk_to_numpy(mask.GetPointData().GetScalars())
            voxels[:] = (labels == label_class.value).ravel()
            if not logic.SetBinaryLabelmapToSegment(mask, node, segment_id, logic.MODE_REPLACE):
                raise InputError(f"Slicer could not store segment '{segment_id}'.")
    except Exception:
        remove_nodes([node])
        raise
    return node


def labels_from_segmentation_node(segmentation_node: Any, classes: Sequence[LabelClass],
                                  reference_node: Any) -> np.ndarray:
    """A label map of the classes from a segmentation node (inverse of
    :func:`add_segmentation_node`; also reads a segmentation the user has edited).

    Segments are found by the class name, then by the segment ID that
    :func:`add_segmentation_node` gives; a class without a segment stays empty. Where segments
    overlap, the later class wins.

    Returns:
        ``(z, y, x)`` array on the grid of ``reference_node``: uint8 when every value fits,
        else int32.
    """
    slicer = _slicer()
    grid = _grid_shape(reference_node)
    top = max([c.value for c in classes], default=0)
    labels = np.zeros(grid, dtype=np.uint8 if top <= 255 else np.int32)
    segmentation = segmentation_node.GetSegmentation()
    for segment_id, label_class in zip(_segment_ids(classes), classes):
        found = segmentation.GetSegmentIdBySegmentName(label_class.name)
        if not found and segmentation.GetSegment(segment_id) is not None:
            found = segment_id
        if not found:
            continue
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, found,
                                                          reference_node)
        labels[mask > 0] = label_class.value
    return labels


# ----------------------------------------------------------------------------- sequences, tables


def add_candidate_sequence(candidates: np.ndarray, geometry: Geometry, name: str,
                           scores: Optional[Sequence[float]] = None,
                           selected_index: Optional[int] = None,
                           scene: Any = None) -> tuple[Any, Any]:
    """Add HEAL's candidate images as a sequence with a browser (browse with a slider).

    Args:
        candidates: ``(n, z, y, x)`` on a 3D ``geometry``, or ``(n, y, x[, 3])`` on a 2D one.
        geometry: the candidates' geometry (the input's).
        name: wanted sequence name (made unique); the browser is ``<name>_browser`` and the
            volume it shows ``<name>_current`` (both made unique).
        scores: edge score of each candidate (length n) or None.
        selected_index: the selected candidate I_B, shown first; None selects item 0.
        scene: the MRML scene (default ``slicer.mrmlScene``).

    Returns:
        ``(sequence_node, browser_node)``. Item ``i`` has index value ``"i"`` and is named
        ``"candidate i score=S"`` with `` (selected)`` appended for the selected one; the
        sequence's attribute ``SFUDA.selected_index`` holds the selected index.
    """
    slicer = _slicer()
    scene = _scene_or_default(scene)
    stack = np.asarray(candidates)
    n = int(stack.shape[0]) if stack.ndim else 0
    if n == 0:
        raise InputError("There are no candidate images to show: run HEAL with at least one "
                         "candidate (n_candidates >= 1).")
    if scores is not None and len(scores) != n:
        raise InputError(f"{len(scores)} scores for {n} candidates: give one score per "
                         "candidate.")
    if selected_index is not None and not 0 <= selected_index < n:
        raise InputError(f"Selected index {selected_index} is outside 0..{n - 1}.")

    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
    created = [sequence]
    try:
        sequence.SetIndexName("candidate")
        sequence.SetIndexUnit("")
        sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
        for i in range(n):
            array, grid_geometry = _as_3d(Volume(stack[i], geometry))
            item = (slicer.vtkMRMLVectorVolumeNode() if array.ndim == 4
                    else slicer.vtkMRMLScalarVolumeNode())
            _fill_volume_node(item, array, grid_geometry)
            label = f"candidate {i}"
            if scores is not None:
                label += f" score={float(scores[i]):.6g}"
            if i == selected_index:
                label += " (selected)"
            item.SetName(label)
            sequence.SetDataNodeAtValue(item, str(i))
        if selected_index is not None:
            sequence.SetAttribute("SFUDA.selected_index", str(int(selected_index)))

        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                          scene.GenerateUniqueName(f"{name}_browser"))
        created.append(browser)
        if hasattr(browser, "SetAndObservePrimarySequenceNodeID"):
            browser.SetAndObservePrimarySequenceNodeID(sequence.GetID())
        else:
            browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        browser.SetOverwriteProxyName(sequence, False)
        browser.SetSelectedItemNumber(int(selected_index or 0))
        proxy = browser.GetProxyNode(sequence)
        if proxy is not None:
            proxy.SetName(scene.GenerateUniqueName(f"{name}_current"))
    except Exception:
        remove_nodes(created)
        raise
    return sequence, browser


def _is_number(value: Any) -> bool:
    """True for Python/numpy numbers and booleans."""
    return isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_))


def add_table_node(rows: Sequence[Mapping[str, Any]], name: str, scene: Any = None) -> Any:
    """Add a table with one row per dict.

    Columns are the keys in order of first appearance. A column whose values are all numbers
    (bools count, as 0/1) or missing/None is a double column (missing -> NaN); any other column
    is a string column (missing -> ``""``).

    Returns:
        The new ``vtkMRMLTableNode``.
    """
    import vtk

    scene = _scene_or_default(scene)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    try:
        for column in columns:
            values = [row.get(column) for row in rows]
            if all(v is None or _is_number(v) for v in values):
                array = vtk.vtkDoubleArray()
                for v in values:
                    array.InsertNextValue(float("nan") if v is None else float(v))
            else:
                array = vtk.vtkStringArray()
                for v in values:
                    array.InsertNextValue("" if v is None else str(v))
            array.SetName(str(column))
            node.AddColumn(array)
    except Exception:
        remove_nodes([node])
        raise
    return node


# ----------------------------------------------------------------------------- the result


def add_result_to_scene(result: Result, input_node: Any, base_name: Optional[str] = None,
                        map_color_table: str = "Inferno",
                        terminology: Optional[Mapping[str, str]] = None,
                        folder_name: Optional[str] = None) -> dict[str, Any]:
    """Add every layer of a :class:`Result` to the input's scene as new nodes, in one
    subject-hierarchy folder.

    Nothing that is already in the scene is modified; on any error the nodes added so far are
    removed again. Every node name starts with ``base_name`` (default ``"<input>_<method>"``)
    and is unique in the scene. The nodes go into one folder beside the input (see
    ``run_folder.py``): removing the folder removes the run, display and storage nodes included.

    Args:
        result: a method's result, on the grid of ``input_node``.
        input_node: the scalar volume the result was computed from.
        base_name: name prefix of the new nodes.
        map_color_table: colour table of the uncertainty maps (falls back as in
            :func:`add_map_node`).
        terminology: class name -> Slicer terminology entry for the segments (see
            ``terminology.class_terminology``).
        folder_name: the run folder's name (default ``"<method>: <input>"``).

    Returns:
        The new nodes by key: ``"segmentation"``; ``"map_<name>"`` for each of
        ``result.maps`` (``map_entropy``, ``map_nig_variance``); ``"label_colors"`` and
        ``"label_map_<name>"`` (label map volume nodes) for ``result.label_maps``;
        ``"candidates"``, ``"candidate_browser"``, ``"candidate_proxy"`` (when the sequences
        logic made one) and ``"candidate_scores"`` (table: index, score, selected);
        ``"statistics"`` (table of ``result.structure_stats``); ``"review_queue"`` (table of
        ``result.review_queue``, one row per region, when the result names a map to review;
        no row: nothing above the map's review threshold). When the input has a parent
        transform, the new nodes are placed under it too. Their folder is
        ``run_folder.run_folder_of(nodes["segmentation"])``.

    Raises:
        InputError: the result does not fit the input volume's grid or geometry.
    """
    scene = _node_scene(input_node, "input volume")
    _check_scalar_volume(input_node)
    grid = _grid_shape(input_node)
    geometry = _geometry_of_node(input_node)
    result_geometry = (result.geometry if result.geometry.ndim == 3
                       else _embed_2d(result.geometry))
    if not geometry.matches(result_geometry):
        raise InputError(f"The result's geometry {result.geometry.to_dict()} is not the geometry "
                         f"of '{input_node.GetName()}' {geometry.to_dict()}: add the result to "
                         "the volume it was computed from.")
    base = base_name or f"{input_node.GetName()}_{result.method}"

    created: dict[str, Any] = {}
    try:
        created["segmentation"] = add_segmentation_node(result.labels, result.classes, input_node,
                                                        f"{base}_segmentation", terminology)
        for key, values in result.maps.items():
            created[f"map_{key}"] = add_map_node(_on_grid(values, grid, f"map '{key}'"),
                                                 f"{base}_{key}", geometry, map_color_table,
                                                 scene)
        if result.label_maps:
            colors = add_label_color_table(result.classes, f"{base}_label_colors", scene)
            created["label_colors"] = colors
            for key, values in result.label_maps.items():
                values = _on_grid(values, grid, f"label map '{key}'")
                if not np.issubdtype(values.dtype, np.integer):
                    raise InputError(f"Label map '{key}' has dtype {values.dtype}: label maps "
                                     "must hold integer label values.")
                node = add_volume_node(Volume(values, geometry), f"{base}_{key}", scene,
                                       "vtkMRMLLabelMapVolumeNode")
                created[f"label_map_{key}"] = node
                node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        if result.candidates is not None and len(result.candidates):
            stack = np.asarray(result.candidates)
            if _on_grid(stack[0], grid, "candidate image").ndim == stack.ndim:
                stack = stack[:, None]  # 2D candidates on a one-slice grid (a view, no copy)
            scores = list(result.candidate_scores) or None
            sequence, browser = add_candidate_sequence(stack, geometry, f"{base}_candidates",
                                                       scores, result.selected_index, scene)
            created["candidates"] = sequence
            created["candidate_browser"] = browser
            proxy = browser.GetProxyNode(sequence)
            if proxy is not None:
                created["candidate_proxy"] = proxy
            if scores is not None:
                rows = [{"index": i, "score": float(s), "selected": i == result.selected_index}
                        for i, s in enumerate(scores)]
                created["candidate_scores"] = add_table_node(rows, f"{base}_candidate_scores",
                                                             scene)
        if result.structure_stats:
            created["statistics"] = add_table_node(result.structure_stats, f"{base}_statistics",
                                                   scene)
        if result.reliability.get("map"):
            from .review_queue_nodes import add_review_queue_table

            created["review_queue"] = add_review_queue_table(result.review_queue, f"{base}_review_queue",
                                                             scene)
        transform_id = input_node.GetTransformNodeID()
        if transform_id:
            for node in created.values():
                if node.IsA("vtkMRMLTransformableNode"):
                    node.SetAndObserveTransformNodeID(transform_id)
        remove_dependents_with_run_nodes(scene)
        put_in_run_folder(created.values(), input_node,
                          folder_name or run_folder_name(result.method, input_node.GetName()))
    except Exception:
        remove_nodes(created.values())
        raise
    return created


# ----------------------------------------------------------------------------- cleanup


def dependent_nodes(node: Any) -> list[Any]:
    """Display and storage nodes of ``node`` (colour legends included) and, for a sequence
    browser, its proxy nodes with theirs."""
    import vtk

    dependents = []
    if node.IsA("vtkMRMLSequenceBrowserNode"):
        proxies = vtk.vtkCollection()
        node.GetAllProxyNodes(proxies)
        for i in range(proxies.GetNumberOfItems()):
            proxy = proxies.GetItemAsObject(i)
            dependents.append(proxy)
            dependents.extend(dependent_nodes(proxy))
    if node.IsA("vtkMRMLDisplayableNode"):
        dependents.extend(node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes()))
    if node.IsA("vtkMRMLStorableNode"):
        dependents.extend(node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes()))
    return [d for d in dependents if d is not None]


def remove_nodes(nodes: Iterable[Any]) -> None:
    """Remove nodes the bridge created, with their display and storage nodes (and a browser's
    proxy nodes), from their scene. Nodes already removed or None are skipped."""
    to_remove: dict[str, Any] = {}
    for node in list(nodes):
        if node is None or node.GetScene() is None:
            continue
        for n in (node, *dependent_nodes(node)):
            if n.GetScene() is not None:
                to_remove.setdefault(n.GetID(), n)
    for node in to_remove.values():
        scene = node.GetScene()
        if scene is not None:
            scene.RemoveNode(node)


def save_node(node: Any, path: str) -> None:
    """Write a node to a file with its default storage node, without ``slicer.app`` and
    without adding anything to the scene (``.nrrd``/``.nii.gz`` volumes, ``.seg.nrrd``
    segmentations, ``.csv``/``.tsv`` tables).

    Raises:
        InputError: the node cannot be written to ``path``.
    """
    _node_scene(node, "node to save")
    storage = node.CreateDefaultStorageNode()
    if storage is None:
        raise InputError(f"Slicer has no writer for a {node.GetClassName()}.")
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise InputError(f"Could not write '{path}': check that the folder exists and is "
                         "writable and that the extension suits the node (.nrrd, .nii.gz, "
                         ".seg.nrrd, .csv).")
