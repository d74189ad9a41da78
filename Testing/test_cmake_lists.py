"""The Slicer extension's CMake files list every library and resource file, and lay them out so
that the installed tree has ``SFUDASegment.py``, ``SFUDASegmentLib/`` and ``Resources/`` side by
side (see the comment in ``SFUDASegment/CMakeLists.txt``).

When this test fails after you added a file: add the path it names to the list it names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_CMAKE = REPO / "CMakeLists.txt"
MODULE_DIR = REPO / "SFUDASegment"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"


def strip_comments(text: str) -> str:
    """CMake text without ``#`` comments (a ``#`` inside a quoted argument is kept)."""
    lines = []
    for line in text.splitlines():
        quoted, kept = False, []
        for char in line:
            if char == '"':
                quoted = not quoted
            elif char == "#" and not quoted:
                break
            kept.append(char)
        lines.append("".join(kept))
    return "\n".join(lines)


def commands(text: str) -> list[tuple[str, list[str]]]:
    """Every ``name(arguments)`` command of a CMake file, in order, with its arguments split at
    white space (quotes removed). Parentheses occur only inside quoted arguments here."""
    found = []
    pattern = r'\b([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:"[^"]*"|[^()"])*)\)'
    for match in re.finditer(pattern, strip_comments(text)):
        arguments = re.findall(r'"([^"]*)"|(\S+)', match.group(2))
        found.append((match.group(1), [quoted or bare for quoted, bare in arguments]))
    return found


def variables(text: str) -> dict[str, list[str]]:
    """``set(NAME values...)`` of a file, with earlier variables substituted."""
    values: dict[str, list[str]] = {}
    for name, arguments in commands(text):
        if name.lower() == "set" and arguments:
            expanded = []
            for value in arguments[1:]:
                for key, known in values.items():
                    if len(known) == 1:
                        value = value.replace("${" + key + "}", known[0])
                expanded.append(value)
            values[arguments[0]] = expanded
    return values


def call(text: str, command: str) -> list[str]:
    """The arguments of the one call of ``command`` in ``text``."""
    calls = [args for name, args in commands(text) if name == command]
    assert len(calls) == 1, f"expected one {command}(...) call, found {len(calls)}"
    return calls[0]


def keyword_values(arguments: list[str], keyword: str, keywords: set[str]) -> list[str]:
    """The values after ``keyword`` up to the next keyword."""
    start = arguments.index(keyword) + 1
    end = start
    while end < len(arguments) and arguments[end] not in keywords:
        end += 1
    return arguments[start:end]


@pytest.fixture(scope="module")
def module_lists() -> dict[str, list[str]]:
    return variables(MODULE_CMAKE.read_text())


def files_on_disk(folder: str, pattern: str) -> set[str]:
    """Files under ``REPO/folder`` matching ``pattern``, as repository-relative paths."""
    return {p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_parser_reads_sets_calls_and_skips_comments() -> None:
    text = ('set(A x)  # set(B not-a-call)\nset(D "a (b) c")\nset(L\n  ${A}/one.py # trailing\n  "two # three"\n  )\n'
            'f(K v1 v2 OPT)\n')
    assert variables(text) == {"A": ["x"], "D": ["a (b) c"], "L": ["x/one.py", "two # three"]}
    args = call(text, "f")
    assert keyword_values(args, "K", {"K", "OPT"}) == ["v1", "v2"]


def test_every_library_file_is_listed(module_lists: dict[str, list[str]]) -> None:
    missing = sorted(files_on_disk("SFUDASegmentLib", "*.py") - set(module_lists["MODULE_LIBRARY_SCRIPTS"]))
    assert not missing, ("add to MODULE_LIBRARY_SCRIPTS in SFUDASegment/CMakeLists.txt: "
                         + ", ".join(missing))


def test_every_resource_file_is_listed(module_lists: dict[str, list[str]]) -> None:
    missing = sorted(files_on_disk("Resources", "*") - set(module_lists["MODULE_PYTHON_RESOURCES"]))
    assert not missing, ("add to MODULE_PYTHON_RESOURCES in SFUDASegment/CMakeLists.txt: "
                         + ", ".join(missing))


def test_every_listed_file_exists_once(module_lists: dict[str, list[str]]) -> None:
    listed = {name: module_lists[name] for name in
              ("MODULE_PYTHON_SCRIPTS", "MODULE_LIBRARY_SCRIPTS", "MODULE_PYTHON_RESOURCES")}
    absent = [f"{path} ({name})" for name, paths in listed.items() for path in paths
              if not ((MODULE_DIR if name == "MODULE_PYTHON_SCRIPTS" else REPO) / path).is_file()]
    assert not absent, "listed in SFUDASegment/CMakeLists.txt but missing: " + ", ".join(absent)
    for name, paths in listed.items():
        assert len(paths) == len(set(paths)), f"{name} lists a file twice"
    assert "GLOB" not in strip_comments(MODULE_CMAKE.read_text()).upper()


def test_installed_tree_has_module_library_and_resources_side_by_side(
        module_lists: dict[str, list[str]]) -> None:
    text = MODULE_CMAKE.read_text()
    assert module_lists["MODULE_NAME"] == ["SFUDASegment"]
    assert module_lists["MODULE_PYTHON_SCRIPTS"] == ["SFUDASegment.py"]

    module = call(text, "slicerMacroBuildScriptedModule")
    keys = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}
    assert keyword_values(module, "NAME", keys) == ["${MODULE_NAME}"]
    assert keyword_values(module, "SCRIPTS", keys) == ["${MODULE_PYTHON_SCRIPTS}"]
    assert "WITH_GENERIC_TESTS" in module and "WITH_SUBDIR" not in module

    library = call(text, "ctkMacroCompilePythonScript")
    keys = {"TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR",
            "NO_INSTALL_SUBDIR", "GLOBAL_TARGET"}
    expected = {
        "SCRIPTS": ["${MODULE_LIBRARY_SCRIPTS}"],
        "RESOURCES": ["${MODULE_PYTHON_RESOURCES}"],
        # files are copied to DESTINATION_DIR/<path relative to SOURCE_DIR> ...
        "SOURCE_DIR": ["${PROJECT_SOURCE_DIR}"],
        # ... which is where slicerMacroBuildScriptedModule puts SFUDASegment.py ...
        "DESTINATION_DIR": ["${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"],
        "INSTALL_DIR": ["${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"],
    }
    for keyword, values in expected.items():
        assert keyword_values(library, keyword, keys) == values, keyword
    # ... and installed as that folder's contents, like slicerMacroBuildScriptedModule does.
    assert "NO_INSTALL_SUBDIR" in library

    installed = set(module_lists["MODULE_PYTHON_SCRIPTS"]) | set(
        module_lists["MODULE_LIBRARY_SCRIPTS"]) | set(module_lists["MODULE_PYTHON_RESOURCES"])
    assert not [p for p in installed if p.startswith("..") or p.startswith("/")]
    for path in ("SFUDASegment.py", "SFUDASegmentLib/__init__.py", "SFUDASegmentLib/slicer_bridge/jobs.py",
                 "SFUDASegmentLib/cli.py", "Resources/UI/SFUDASegment.ui",
                 "Resources/Icons/SFUDASegment.png"):
        assert path in installed, path


def test_top_level_extension_metadata() -> None:
    text = TOP_CMAKE.read_text()
    values = variables(text)
    for key in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert values.get(key) and values[key][0].strip(), key
    assert values["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert values["EXTENSION_DEPENDS"] == ["PyTorch"]
    # The public addresses come from one marked place: two variables set when publishing
    # (empty until then), from which the homepage, icon and screenshot addresses are made.
    assert strip_comments(text).count("https://") == 0
    assert text.count("SET WHEN PUBLISHING") == 1
    repository, raw = values["SFUDASEGMENT_REPOSITORY"], values["SFUDASEGMENT_RAW_FILES"]
    assert len(repository) == len(raw) == 1
    assert all(v == "" or v.startswith("https://") for v in (repository[0], raw[0]))
    assert values["EXTENSION_HOMEPAGE"] == repository
    assert values["EXTENSION_ICONURL"] == [raw[0] + "/Resources/Icons/SFUDASegment.png"]
    (screenshot,) = values["EXTENSION_SCREENSHOTURLS"]
    assert screenshot.startswith(raw[0] + "/") and (REPO / screenshot[len(raw[0]) + 1:]).is_file()
    assert (REPO / "Resources" / "Icons" / "SFUDASegment.png").is_file()

    sequence = [(name, args) for name, args in commands(text) if name != "set"]
    assert sequence == [
        ("cmake_minimum_required", ["VERSION", "3.16.3"]),
        ("project", ["SFUDASegment"]),
        ("find_package", ["Slicer", "REQUIRED"]),
        ("include", ["${Slicer_USE_FILE}"]),
        ("add_subdirectory", ["SFUDASegment"]),
        ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]),
        ("include", ["${Slicer_EXTENSION_CPACK}"]),
    ]


def test_resources_the_module_opens_are_installed(module_lists: dict[str, list[str]]) -> None:
    source = (MODULE_DIR / "SFUDASegment.py").read_text()
    opened = set(re.findall(r'resourcePath\("([^"]+)"\)', source))
    assert "UI/SFUDASegment.ui" in opened
    resources = set(module_lists["MODULE_PYTHON_RESOURCES"])
    assert {f"Resources/{name}" for name in opened} <= resources
    for folder, name in re.findall(r'os\.path\.join\(RESOURCES_DIR, "(\w+)", "([\w.]+)"\)', source):
        assert f"Resources/{folder}/{name}" in resources, f"{folder}/{name}"
