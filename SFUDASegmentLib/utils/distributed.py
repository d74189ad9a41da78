"""Data-parallel runs on several processes with ``torch.distributed`` (launched by ``torchrun``).

The library has no scheduler of its own: ``torchrun --nproc-per-node N -m SFUDASegmentLib.cli ...``
starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`process_group` reads them, joins the group (NCCL on GPU, gloo on CPU,
``env://`` rendezvous, which works on Windows, macOS and Linux) and hands out a
:class:`DistributedContext`. Without those variables it yields :data:`SINGLE_PROCESS` and
nothing is initialised, so every caller has one code path.

A training run on N processes sees exactly the batches of a run on one process: every process
draws the whole global batch with the same seeded generators and keeps its share
(:meth:`DistributedContext.batch_part`); DistributedDataParallel averages the gradients, and
terms that are not averages over samples (the soft Dice of the batch) sum their statistics
over the processes first (:meth:`DistributedContext.sum_with_gradient`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ..errors import InputError
from .device import resolve_device

TRAINING_TIMEOUT = datetime.timedelta(minutes=30)
"""How long a process waits for the others at a collective during training (rank 0 validating
or writing the training state while the others wait is the longest pause)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a group of data-parallel processes.

    Attributes:
        rank: this process, ``0 .. world_size - 1``; rank 0 reports progress and writes files.
        world_size: number of processes (1: a plain single-process run).
        local_rank: this process on its machine (its GPU index).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that reports progress and writes outputs (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def device(self, request: str) -> torch.device:
        """The compute device of this process: ``request`` resolved, its own GPU under torchrun.

        Raises:
            DeviceError: CUDA asked for without CUDA.
        """
        device = resolve_device(request)
        if device.type == "cuda" and self.is_distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def batch_part(self, global_batch: int) -> slice:
        """This process's elements of a global batch (contiguous, equal shares).

        Raises:
            InputError: the batch does not split evenly over the processes.
        """
        if global_batch % self.world_size:
            raise InputError(
                f"The batch size {global_batch} does not split evenly over {self.world_size} processes. "
                f"Use a multiple of {self.world_size} (the batch size is the global batch of all processes).")
        share = global_batch // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def items(self, count: int) -> range:
        """This process's share of ``count`` independent work items (every world_size-th)."""
        return range(self.rank, count, self.world_size)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model for training: DistributedDataParallel over the group, or itself alone."""
        if not self.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    def sum_with_gradient(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes, differentiable (the gradient is summed back the same way).

        With DistributedDataParallel's averaging of the gradients, a loss built from the summed
        statistics has exactly the gradient of the same loss on the whole global batch.
        """
        if not self.is_distributed:
            return tensor
        return _SumOverProcesses.apply(tensor)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes (no gradient); a new tensor on ``tensor``'s device.

        NCCL reduces CUDA tensors only: a CPU tensor travels through this process's GPU.
        """
        if not self.is_distributed:
            return tensor.detach().clone()
        on_gpu = torch.distributed.get_backend() == "nccl"
        out = tensor.detach().to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else tensor.device,
                                 copy=True)
        torch.distributed.all_reduce(out)
        return out.to(tensor.device)

    def mean(self, value: float) -> float:
        """Mean of a number over the processes."""
        if not self.is_distributed:
            return float(value)
        return float(self.sum(torch.tensor([float(value)], dtype=torch.float64))[0]) / self.world_size

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if not self.is_distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.is_distributed:
            torch.distributed.barrier()


SINGLE_PROCESS = DistributedContext()


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the incoming gradient the same way."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class
        out = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out)
        return out


def environment_rank() -> int:
    """``RANK`` as set by torchrun (0 when absent): lets a command know whether it is the process
    that writes before it joins the group.

    Raises:
        InputError: a value that is not a non-negative integer.
    """
    text = os.environ.get("RANK", "0")
    if not text.isdigit():
        raise InputError(f"RANK is '{text}'; it must be a non-negative integer. Launch with "
                         "`torchrun --nproc-per-node N ...` or unset it.")
    return int(text)


def environment_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent).

    Raises:
        InputError: a value that is not a positive integer.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise InputError(f"WORLD_SIZE is '{text}'; it must be a positive integer. Launch with "
                         "`torchrun --nproc-per-node N ...` or unset it.")
    return size


@contextlib.contextmanager
def process_group(device: str = "auto", backend: Optional[str] = None,
                  timeout: datetime.timedelta = TRAINING_TIMEOUT) -> Iterator[DistributedContext]:
    """Join the process group torchrun set up, for the duration of the block.

    Args:
        device: the run's device request (``auto``, ``cpu``, ``cuda``): picks NCCL for CUDA and
            gloo for CPU, and makes this process's GPU (``LOCAL_RANK``) the current one.
        backend: force a backend (e.g. ``"gloo"`` to exchange only Python objects).
        timeout: how long a collective waits for the slowest process.

    Yields:
        The :class:`DistributedContext`; :data:`SINGLE_PROCESS` when not launched by torchrun
        (``WORLD_SIZE`` unset or 1), or when the caller already initialised a group (then it
        is described, used and left open).

    Raises:
        InputError: torchrun's variables are incomplete.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield DistributedContext(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                                 int(os.environ.get("LOCAL_RANK", "0")))
        return
    world_size = environment_world_size()
    if world_size == 1:
        yield SINGLE_PROCESS
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing or not torch.distributed.is_available():
        raise InputError(f"WORLD_SIZE is {world_size} but {', '.join(missing) or 'torch.distributed'} "
                         "is missing. Start several processes with `torchrun --nproc-per-node N ...`.")
    context = DistributedContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    on_gpu = resolve_device(device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(context.local_rank)
    torch.distributed.init_process_group(backend or ("nccl" if on_gpu else "gloo"), init_method="env://",
                                         world_size=world_size, rank=context.rank, timeout=timeout)
    try:
        yield context
        context.barrier()
    finally:
        torch.distributed.destroy_process_group()
