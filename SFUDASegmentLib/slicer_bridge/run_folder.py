"""One subject-hierarchy folder per run: the run's nodes together, removed together.

A HEAL run adds a dozen nodes (segmentation, maps, label maps and their colour table, the
candidate sequence with its browser and proxy, tables). :func:`put_in_run_folder` puts them in
one folder of the subject hierarchy (Slicer's Data module), named after the method and the
input, under the input volume's study (or wherever the input sits), as SlicerTotalSegmentator
puts its results under the input's study.

Deleting that folder in the Data module removes its items' data nodes (subject hierarchy's
recursive remove). Their display and storage nodes (and colour legends) are not data nodes
and would stay behind as orphans, so :func:`remove_dependents_with_run_nodes` installs one
scene observer that removes them together with the run's nodes.

Everything that touches Slicer imports it inside the function (see ``mrml.py``).
"""

from __future__ import annotations

from typing import Any, Iterable

#: Attribute set on every data node of a run: the name of its folder.
RUN_ATTRIBUTE = "SFUDASegment.Run"


def run_folder_name(method_label: str, input_name: str) -> str:
    """``"HEAL (learning-free): MRHead"``: the method and the input."""
    return f"{method_label}: {input_name}"


def _subject_hierarchy(scene: Any) -> Any:
    import slicer

    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def put_in_run_folder(nodes: Iterable[Any], input_node: Any, name: str) -> int:
    """Create a subject-hierarchy folder beside the input and move ``nodes`` into it.

    Args:
        nodes: the run's data nodes (each gets an item in the folder; one that already has an
            item, as in Slicer where items are created for new nodes, is moved there).
        input_node: the volume the run read; the folder goes under its parent item (its study
            for DICOM data), or at the top when it has none.
        name: the folder name; ``" (2)"``, ``" (3)"``... is added when a sibling has it.

    Returns:
        The folder's subject-hierarchy item ID.
    """
    scene = input_node.GetScene()
    hierarchy = _subject_hierarchy(scene)
    input_item = hierarchy.GetItemByDataNode(input_node)
    parent = hierarchy.GetItemParent(input_item) if input_item else 0
    if not parent:
        parent = hierarchy.GetSceneItemID()
    unique, copy = name, 1
    while hierarchy.GetItemChildWithName(parent, unique):
        copy += 1
        unique = f"{name} ({copy})"
    folder = hierarchy.CreateFolderItem(parent, unique)
    for node in nodes:
        node.SetAttribute(RUN_ATTRIBUTE, unique)
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, folder)
        else:
            hierarchy.CreateItem(folder, node)
    return folder


def run_folder_of(node: Any) -> int:
    """The run folder item of a node a run created (0 when it is in none)."""
    hierarchy = _subject_hierarchy(node.GetScene())
    item = hierarchy.GetItemByDataNode(node)
    return hierarchy.GetItemParent(item) if item else 0


def remove_run_folder(scene: Any, folder: int) -> None:
    """Remove a run folder with everything in it (what deleting it in the Data module does)."""
    _subject_hierarchy(scene).RemoveItem(folder, True, True)


def remove_dependents_with_run_nodes(scene: Any) -> None:
    """Make the scene remove the display and storage nodes of a run's node together with it
    (once per scene; later calls do nothing).

    A node counts as a run's node when it carries :data:`RUN_ATTRIBUTE`; other nodes are left
    alone. Dependents are collected when the node is about to be removed and removed right
    after it, unless something else removed them already.
    """
    import vtk

    from .mrml import dependent_nodes

    if getattr(scene, "_sfuda_run_cleanup", False):
        return
    pending: dict[str, list] = {}

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def about_to_be_removed(caller: Any, event: str, node: Any) -> None:
        if node is not None and node.GetAttribute(RUN_ATTRIBUTE):
            pending[node.GetID()] = dependent_nodes(node)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def removed(caller: Any, event: str, node: Any) -> None:
        for dependent in pending.pop(node.GetID() if node is not None else "", []):
            if dependent.GetScene() is not None:
                caller.RemoveNode(dependent)

    scene.AddObserver(scene.NodeAboutToBeRemovedEvent, about_to_be_removed)
    scene.AddObserver(scene.NodeRemovedEvent, removed)
    scene._sfuda_run_cleanup = True
