"""What makes CPU sampling fast without changing it: network calls on groups of items
(``sampling.network_groups``), worker threads with one PyTorch thread each
(``device.single_threaded_workers``) and the residual block's fused, in-place inference path."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from SFUDASegmentLib.diffusion.sampling import CPU_VOXELS_PER_CALL, network_groups
from SFUDASegmentLib.nets.diffusion_unet import _ResidualBlock
from SFUDASegmentLib.utils.device import single_threaded_workers

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def sizes(groups: list[slice]) -> list[int]:
    return [g.stop - g.start for g in groups]


def test_network_groups_hand_computed():
    slice_176 = 176 * 176  # 30976 voxels: two fit the budget of 65536
    assert CPU_VOXELS_PER_CALL == 65_536
    # 48 items (8 slices x 6 candidates): 24 calls of 2, shared by 2 workers
    assert sizes(network_groups(CPU, 48, slice_176, 2)) == [2] * 24
    # one slice's 6 candidates: 3 calls of 2 would leave a worker idle, so 4 calls, larger first
    assert sizes(network_groups(CPU, 6, slice_176, 2)) == [2, 2, 1, 1]
    assert sizes(network_groups(CPU, 6, slice_176, 1)) == [2, 2, 2]
    assert sizes(network_groups(CPU, 7, slice_176, 2)) == [2, 2, 2, 1]
    # 64x64 slices: 16 fit, so 48 need 3 calls: 4 for 2 workers
    assert sizes(network_groups(CPU, 48, 64 * 64, 2)) == [12] * 4
    # a small batch: one call for one worker, a call per worker for two (their own threads
    # would wait for each other after every operation); one call on GPU
    assert sizes(network_groups(CPU, 4, 48 * 48, 1)) == [4]
    assert sizes(network_groups(CPU, 5, 48 * 48, 2)) == [3, 2]
    assert sizes(network_groups(CPU, 1, 48 * 48, 2)) == [1]
    assert sizes(network_groups(GPU, 48, slice_176, 2)) == [48]
    # a 128^3 volume is over the budget alone: one item a call
    assert sizes(network_groups(CPU, 6, 128 ** 3, 2)) == [1] * 6


@pytest.mark.parametrize("batch, voxels, workers", [(48, 30976, 2), (13, 5000, 2), (9, 70000, 3), (5, 20000, 1)])
def test_network_groups_cover_the_batch_in_order(batch, voxels, workers):
    groups = network_groups(CPU, batch, voxels, workers)
    covered = [i for g in groups for i in range(g.start, g.stop)]
    assert covered == list(range(batch))
    assert all((g.stop - g.start) * voxels <= CPU_VOXELS_PER_CALL or g.stop - g.start == 1 for g in groups)
    assert len(groups) % workers == 0 or len(groups) == batch


def test_single_threaded_workers_set_one_thread_and_restore():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded_workers(2) as pool:
            assert pool is not None and torch.get_num_threads() == 1
            names = set(pool.map(lambda _: (threading.current_thread().name, torch.get_num_threads()), range(8)))
            assert all(name.startswith("sfuda-cpu") and threads == 1 for name, threads in names)
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), single_threaded_workers(2):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with single_threaded_workers(1) as pool:
            assert pool is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dims", [2, 3])
def test_residual_block_inference_path_equals_the_written_formula(dims):
    torch.manual_seed(3)
    block = _ResidualBlock(dims, 8, 12, embedding_dim=16, groups=4, dropout=0.0).eval()
    with torch.no_grad():
        for parameter in block.parameters():  # conv2 starts at zero: make every part count
            parameter.normal_(0.0, 0.3)
    x = torch.randn((2, 8) + (6,) * dims)
    embedding = torch.randn((2, 16))

    def written(x: torch.Tensor) -> torch.Tensor:  # the block's definition, operation by operation
        h = block.conv1(F.silu(block.norm1(x)))
        scale, shift = block.embedding(F.silu(embedding)).reshape(2, 24, *([1] * dims)).chunk(2, dim=1)
        h = block.norm2(h) * (1 + scale) + shift
        return block.skip(x) + block.conv2(F.silu(h))

    expected = written(x)
    with torch.inference_mode():
        fast = block(x, embedding)
    assert torch.allclose(fast, expected, atol=1e-5) and not torch.allclose(fast, block.skip(x), atol=1e-2)
    # with autograd the block does not overwrite what backward needs, and its gradient is the formula's
    leaf = x.clone().requires_grad_()
    block(leaf, embedding).square().sum().backward()
    reference = x.clone().requires_grad_()
    written(reference).square().sum().backward()
    assert torch.allclose(leaf.grad, reference.grad, atol=1e-4)
