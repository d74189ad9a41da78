"""Compute device selection, mixed precision, memory measurement and out-of-memory retries.

Nothing here is Unix-only at import time: the peak memory of the process is read with
``ctypes`` on Windows, ``resource`` (imported when needed) on macOS and Linux, and
``/proc/self/status`` where ``resource`` is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch

from ..errors import DeviceError

T = TypeVar("T")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a usable :class:`torch.device`.

    Raises:
        DeviceError: CUDA was asked for but this PyTorch build or machine has none.
    """
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda") or name == "gpu":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise DeviceError(
                f"Device '{device}' was requested but no CUDA GPU is available (PyTorch "
                f"{torch.__version__}, {build}). Use device 'cpu' or 'auto', or install a CUDA "
                "build of PyTorch (in Slicer: the PyTorch extension's PyTorchUtils).")
        return torch.device("cuda" if name == "gpu" else name)
    raise DeviceError(f"Unknown device '{device}'. Use 'auto', 'cpu' or 'cuda'.")


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on GPU (bf16 where supported, else fp16); a no-op on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def inference_layout(net: torch.nn.Module, device: torch.device | str,
                     spatial_dims: int) -> torch.nn.Module:
    """Put a convolutional network's weights in channels-last layout on CPU, in place.

    oneDNN runs the diffusion U-Net's convolutions about 1.4x faster in that layout on CPU
    (2D and 3D; measured with ``bench_speed.py``); outputs agree up to float rounding. Inputs
    need no change. On GPU the layout is left as it is (not measured there).

    Args:
        net: the network (already on ``device``).
        device: where it runs.
        spatial_dims: 2 or 3.

    Returns:
        ``net``.
    """
    if torch.device(device).type == "cpu":
        net.to(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    return net


@contextlib.contextmanager
def single_threaded_workers(workers: int) -> Iterator[Optional[ThreadPoolExecutor]]:
    """A pool of ``workers`` threads that each run PyTorch on one CPU thread (None for one worker).

    For many independent network calls on CPU (the items of a diffusion batch): PyTorch's own
    threads split every operation and wait for each other after it, and on a machine whose
    cores other processes share a waiting thread spins while the other is descheduled. Workers
    that each compute whole calls never wait for each other (``bench_speed.py network``: the
    sampler's calls on 2 workers took 82-131 ms per item and step on 2 busy cores, one call
    on 2 PyTorch threads 156-452 ms). The PyTorch thread count is process-wide: it is 1 while
    the pool exists and restored after.

    Args:
        workers: threads to start (usually ``torch.get_num_threads()``).

    Yields:
        The pool, or None when ``workers <= 1`` (PyTorch's threads are left as they are).
    """
    if workers <= 1:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sfuda-cpu") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def free_memory(device: torch.device) -> None:
    """Release cached memory between pipeline stages."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _ProcessMemoryCounters(ctypes.Structure):
    """Windows ``PROCESS_MEMORY_COUNTERS`` (psapi.h): two DWORDs then eight SIZE_T fields."""

    _fields_ = [("cb", ctypes.c_uint32), ("PageFaultCount", ctypes.c_uint32),
                ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                ("QuotaNonPagedPoolUsage", ctypes.c_size_t), ("PagefileUsage", ctypes.c_size_t),
                ("PeakPagefileUsage", ctypes.c_size_t)]


def _windows_peak_working_set_mb() -> float:
    """Peak working set of this process (``GetProcessMemoryInfo``), in MiB; NaN on failure."""
    kernel32 = ctypes.WinDLL("kernel32")
    psapi = ctypes.WinDLL("psapi")
    kernel32.GetCurrentProcess.restype = ctypes.c_void_p
    psapi.GetProcessMemoryInfo.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ProcessMemoryCounters),
                                           ctypes.c_uint32]
    psapi.GetProcessMemoryInfo.restype = ctypes.c_int
    counters = _ProcessMemoryCounters()
    counters.cb = ctypes.sizeof(counters)
    if not psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        return math.nan
    return counters.PeakWorkingSetSize / 2**20


def peak_rss_from_proc_status(text: str) -> float:
    """The ``VmHWM`` line of a Linux ``/proc/<pid>/status`` text (peak resident set), in MiB;
    NaN when the text has none."""
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024.0  # the kernel writes it in kB
    return math.nan


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (NaN where the system offers no way
    to read it).

    Windows: the peak working set (``GetProcessMemoryInfo`` through ``ctypes``). macOS and
    Linux: ``resource.getrusage`` (``ru_maxrss`` is in bytes on macOS, kB elsewhere); without
    the ``resource`` module, Linux's ``/proc/self/status`` (``VmHWM``).
    """
    if sys.platform == "win32":
        return _windows_peak_working_set_mb()
    try:
        import resource
    except ImportError:
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
                return peak_rss_from_proc_status(handle.read())
        except OSError:
            return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def gpu_memory_info(device: torch.device | None = None) -> tuple[float, float] | None:
    """``(free_mib, total_mib)`` of the GPU, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free / 2**20, total / 2**20


def device_inventory() -> dict:
    """What this PyTorch build can compute on (``sfuda devices --json``; the Slicer panel reads
    it from a child process so that Slicer itself never imports PyTorch).

    Returns:
        ``{"torch": version, "cuda_build": CUDA version of the build or None, "cuda_available":
        bool, "cpu_threads": int, "gpus": [{"device": "cuda:<i>", "name": str, "total_mib":
        float, "free_mib": float}, ...]}``.
    """
    gpus = []
    available = torch.cuda.is_available()
    if available:
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append({"device": f"cuda:{index}", "name": torch.cuda.get_device_name(index),
                         "total_mib": total / 2**20, "free_mib": free / 2**20})
    return {"torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": available, "cpu_threads": torch.get_num_threads(), "gpus": gpus}


@dataclass
class StageTimer:
    """Records seconds and peak memory per named stage.

    ``peak_memory_mb`` holds the GPU peak allocated by PyTorch on CUDA, the process's peak
    resident memory on CPU.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as stage ``name`` (accumulates if repeated)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            else:
                peak = process_peak_rss_mb()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_memory_mb[name] = max(self.peak_memory_mb.get(name, 0.0), peak)

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        return {"device": str(self.device), "seconds": dict(self.seconds),
                "total_seconds": sum(self.seconds.values()),
                "peak_memory_mb": dict(self.peak_memory_mb),
                "peak_memory_kind": "gpu_allocated" if self.device.type == "cuda" else "process_rss"}


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA (or CPU allocator) out-of-memory errors."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def map_in_chunks(fn: Callable[[Sequence[T]], list], items: Sequence[T], chunk_size: int,
                  device: torch.device, what: str = "batch") -> list:
    """Apply ``fn`` to consecutive chunks of ``items``, halving the chunk on out-of-memory.

    Args:
        fn: maps a chunk (a slice of ``items``) to a list of results of the same length.
        items: the work items.
        chunk_size: first chunk size to try (>= 1).
        device: where ``fn`` computes (its cache is emptied after an OOM).
        what: name used in the error message.

    Returns:
        The concatenated results, in order.

    Raises:
        DeviceError: out of memory even with chunks of one item.
    """
    results: list = []
    start, size = 0, max(1, int(chunk_size))
    while start < len(items):
        try:
            out = fn(items[start:start + size])
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_out_of_memory(error):
                raise
            free_memory(device)
            if size == 1:
                raise DeviceError(
                    f"Out of memory on {device} even with a {what} of one. Use a smaller patch "
                    "size or the 2D slice mode, close other GPU programs, or run on CPU "
                    "(device 'cpu').") from error
            size = max(1, size // 2)
            continue
        results.extend(out)
        start += len(out)
    return results
