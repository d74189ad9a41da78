"""Standard terminology (SNOMED CT codes) for the segments of a result.

Slicer stores a segment's meaning as a *terminology entry*: a string of seven ``~``-separated
fields, ``context~category~type~type modifier~anatomic context~region~region modifier``, each
code written ``scheme^value^meaning`` (``SCT^79654002^Edema``). DICOM SEG export writes these
codes into the segment description, so a segmentation keeps its meaning outside Slicer.

Two sources, in this order:

1. The checkpoint's card: ``provenance["terminology"]`` maps a class name (or its label value
   as text) to either a full Slicer entry string or a dict of codes::

       {"lesion": {"category": "SCT^49755003^Morphologically Altered Structure",
                   "type": "SCT^52988006^Lesion", "region": "SCT^10200004^Liver"}}

2. The BraTS tumour classes, recognised by name (necrosis / non-enhancing tumour core, edema,
   enhancing tumour), with the codes SlicerMONAIAuto3DSeg gives its BraTS glioma model
   (lassoan/SlicerMONAIAuto3DSeg, ``UsingStandardTerminology.md``, the example ``labels.csv``:
   category SCT 49755003 "Morphologically Altered Structure"; types SCT 6574001 "Necrosis",
   SCT 79654002 "Edema", SCT 86049000 "Neoplasm, Primary"; anatomic region SCT 12738006
   "Brain"). The same codes are in DICOM CID 7159 "Lesion Segmentation Type" (Necrosis, Edema).

Other classes get no entry (Slicer then shows its generic default). Nothing here imports Slicer.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

from ..config import LabelClass

#: Terminology contexts of Slicer's DICOM master lists (the codes below are DICOM/SNOMED CT).
CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

MORPHOLOGICALLY_ALTERED = "SCT^49755003^Morphologically Altered Structure"
BRAIN = "SCT^12738006^Brain"

#: BraTS class -> SNOMED CT type code (see the module docstring for the source).
BRATS_TYPES: dict[str, str] = {
    "necrosis": "SCT^6574001^Necrosis",
    "edema": "SCT^79654002^Edema",
    "enhancing": "SCT^86049000^Neoplasm, Primary",
}

_EMPTY_CODE = "^^"
_CODE = re.compile(r"^[^~^|]+\^[^~^|]+\^[^~^|]+$")
_DICT_FIELDS = ("category", "type", "type_modifier", "region", "region_modifier")


def brats_class(name: str) -> Optional[str]:
    """``"necrosis"``, ``"edema"`` or ``"enhancing"`` when ``name`` names a BraTS tumour class,
    else None.

    Necrosis: ``necrosis``, ``necrotic core``, ``NCR``, ``NCR/NET``, ``non-enhancing tumour
    core``, ``NETC``. Edema: ``edema``, ``oedema``, ``peritumoral edema``, ``ED``. Enhancing:
    ``enhancing``, ``enhancing tumour``, ``GD-enhancing tumor``, ``ET``. Regions (whole tumour,
    tumour core) are not classes and give None.
    """
    words = re.findall(r"[a-z0-9]+", name.lower())
    text = " ".join(words)
    if not words:
        return None
    if (any(w.startswith("necro") for w in words) or {"ncr", "net", "netc"} & set(words)
            or re.search(r"\bnon ?enhancing\b", text)):
        return "necrosis"
    if any(w in ("edema", "oedema", "ed") or w.endswith("edema") for w in words):
        return "edema"
    if "enhancing" in words or "et" in words:
        return "enhancing"
    return None


def entry_string(category: str, type_: str, type_modifier: str = _EMPTY_CODE,
                 region: str = _EMPTY_CODE, region_modifier: str = _EMPTY_CODE) -> str:
    """A Slicer terminology entry from ``scheme^value^meaning`` codes (DICOM master lists)."""
    return "~".join((CATEGORY_CONTEXT, category, type_, type_modifier or _EMPTY_CODE,
                     ANATOMIC_CONTEXT, region or _EMPTY_CODE, region_modifier or _EMPTY_CODE))


def parse_entry(value: Any) -> str:
    """A checkpoint card's terminology value as a Slicer entry string.

    Args:
        value: a full entry string (seven ``~``-separated fields) or a dict with ``category``
            and ``type`` (and optionally ``type_modifier``, ``region``, ``region_modifier``),
            each a ``scheme^value^meaning`` code.

    Raises:
        ValueError: the value is neither, or a code is malformed (the message says which).
    """
    if isinstance(value, str):
        fields = value.split("~")
        if len(fields) != 7:
            raise ValueError(f"A terminology entry has 7 '~'-separated fields, got {len(fields)} "
                             f"in '{value}'.")
        for code in (fields[1], fields[2]):
            if not _CODE.match(code):
                raise ValueError(f"'{code}' in '{value}' is not a 'scheme^value^meaning' code.")
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_DICT_FIELDS))
        if unknown:
            raise ValueError(f"Unknown terminology field(s) {', '.join(unknown)}; use "
                             f"{', '.join(_DICT_FIELDS)}.")
        codes = {}
        for key in _DICT_FIELDS:
            code = value.get(key)
            if code in (None, "") and key not in ("category", "type"):
                continue
            if not isinstance(code, str) or not _CODE.match(code):
                raise ValueError(f"Terminology field '{key}' must be a 'scheme^value^meaning' code "
                                 f"such as 'SCT^79654002^Edema', got {code!r}.")
            codes[key] = code
        return entry_string(codes["category"], codes["type"], codes.get("type_modifier", _EMPTY_CODE),
                            codes.get("region", _EMPTY_CODE), codes.get("region_modifier", _EMPTY_CODE))
    raise ValueError(f"A terminology entry must be a string or a dict of codes, got {type(value).__name__}.")


def card_terminology(card: Optional[Mapping[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """The terminology entries of a model card (``provenance["terminology"]``).

    Returns:
        ``(entries, problems)``: class name or label value (as text) -> entry string, and one
        readable line per entry that could not be used.
    """
    provenance = (card or {}).get("provenance") or {}
    given = provenance.get("terminology") if isinstance(provenance, Mapping) else None
    if not given:
        return {}, []
    if not isinstance(given, Mapping):
        return {}, ["The checkpoint's terminology must map class names to entries; it is ignored."]
    entries, problems = {}, []
    for key, value in given.items():
        try:
            entries[str(key)] = parse_entry(value)
        except ValueError as error:
            problems.append(f"Terminology of class '{key}' ignored: {error}")
    return entries, problems


def class_terminology(classes: Sequence[LabelClass],
                      card: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """Class name -> Slicer terminology entry, for the classes whose meaning is known: from the
    checkpoint card first (by name, then by label value), else the BraTS classes by name."""
    given, _ = card_terminology(card)
    found: dict[str, str] = {}
    for label_class in classes:
        entry = given.get(label_class.name) or given.get(str(label_class.value))
        if entry is None:
            brats = brats_class(label_class.name)
            if brats is not None:
                entry = entry_string(MORPHOLOGICALLY_ALTERED, BRATS_TYPES[brats], region=BRAIN)
        if entry is not None:
            found[label_class.name] = entry
    return found


def type_code(entry: str) -> tuple[str, str, str]:
    """``(scheme, value, meaning)`` of an entry's type: ``("SCT", "79654002", "Edema")``."""
    scheme, value, meaning = parse_entry(entry).split("~")[2].split("^")
    return scheme, value, meaning
