"""The library on a system without the Unix-only modules (Windows has no ``resource``,
``fcntl``, ``termios``, ``pwd`` or ``grp``), and its peak-memory reading on each platform.

The hiding is done by a ``sitecustomize.py`` put first on PYTHONPATH: it runs at interpreter
start, before anything else, in the test's child process and in every process that child
starts (the job runner keeps PYTHONPATH), so a Unix-only import anywhere fails there.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from SFUDASegmentLib.utils import device

REPO = Path(__file__).resolve().parents[1]
UNIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp")

SITECUSTOMIZE = textwrap.dedent(f'''
    """Hide the Unix-only modules, as on Windows."""
    import sys

    UNIX_ONLY = {set(UNIX_ONLY)!r}

    class HideUnixOnly:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in UNIX_ONLY:
                raise ModuleNotFoundError(f"No module named {{name!r}} (hidden)", name=name)
            return None

    for loaded in [m for m in sys.modules if m.split(".")[0] in UNIX_ONLY]:
        del sys.modules[loaded]
    sys.meta_path.insert(0, HideUnixOnly())
''')

CHILD = textwrap.dedent('''
    import importlib, json, pkgutil, sys
    import torch
    import SFUDASegmentLib
    from SFUDASegmentLib.slicer_bridge.child_queries import JsonQuery
    from SFUDASegmentLib.utils.device import StageTimer

    imported = ["SFUDASegmentLib"]
    for info in pkgutil.walk_packages(SFUDASegmentLib.__path__, "SFUDASegmentLib."):
        importlib.import_module(info.name)
        imported.append(info.name)
    timer = StageTimer(torch.device("cpu"))
    with timer.stage("work"):
        block = bytearray(64 * 2**20)
    answer = JsonQuery(["info", sys.argv[1], "--json"]).start().wait(300)
    print(json.dumps({
        "imported": imported,
        "unix_only_loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r),
        "peak_mb": timer.peak_memory_mb["work"],
        "child_card_classes": [c["name"] for c in answer.value["classes"]] if answer.ok else answer.error,
    }))
''' % (UNIX_ONLY,))


def test_every_library_module_imports_and_runs_without_unix_only_modules(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    demo = REPO / "Resources" / "SampleData" / "phantom_demo.sfuda"
    done = subprocess.run([sys.executable, "-c", CHILD, str(demo)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    library = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
               for p in (REPO / "SFUDASegmentLib").rglob("*.py")}
    assert set(seen["imported"]) == library  # every module of the library, none skipped
    assert seen["unix_only_loaded"] == []
    assert seen["peak_mb"] > 64  # a reading without `resource` (NaN would fail), block included
    assert seen["child_card_classes"] == ["organ", "vessel", "lesion"]  # a child job, hidden too

    check = subprocess.run([sys.executable, "-c", "import resource"], capture_output=True,
                           text=True, env=env)
    assert check.returncode != 0 and "hidden" in check.stderr  # the hiding works


def test_peak_memory_from_proc_status_text() -> None:
    status = "Name:\tpython\nVmPeak:\t 2000000 kB\nVmHWM:\t  524288 kB\nVmRSS:\t 100 kB\n"
    assert device.peak_rss_from_proc_status(status) == 512.0
    assert math.isnan(device.peak_rss_from_proc_status("Name:\tpython\n"))  # no reading


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux only")
def test_peak_memory_readings_agree_on_linux() -> None:
    import resource

    with open("/proc/self/status") as handle:
        from_proc = device.peak_rss_from_proc_status(handle.read())
    from_resource = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    assert from_proc == pytest.approx(from_resource, rel=0.05)
    assert device.process_peak_rss_mb() == pytest.approx(from_resource, rel=0.05)


def test_windows_memory_counters_have_the_psapi_layout() -> None:
    # PROCESS_MEMORY_COUNTERS: cb and PageFaultCount (DWORD), then eight SIZE_T fields.
    size_t = ctypes.sizeof(ctypes.c_size_t)
    assert ctypes.sizeof(device._ProcessMemoryCounters) == 8 + 8 * size_t
    assert device._ProcessMemoryCounters.PeakWorkingSetSize.offset == 8
