"""Fixtures shared by the kernel tests: thread counts and the two loop variants."""

from __future__ import annotations

import pytest
import torch

from workbench.kernels import cpu as cpu_kernels

needs_kernel = pytest.mark.skipif(not cpu_kernels.kernel_available(),
                                  reason="the fused CPU kernels cannot be built here (no C++ compiler?)")


@pytest.fixture
def threads(request):
    """Intra-op threads for one test (``indirect`` parametrisation)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture(params=[True, False], ids=["avx2 loops", "plain loops"])
def simd(request):
    """Run a kernel test with the kernels' AVX2 loops (where this CPU has them) and with the plain
    loops that other CPUs run (``workbench.kernels.cpu.simd_loops``)."""
    if not cpu_kernels.kernel_available():
        pytest.skip("the fused CPU kernels cannot be built here (no C++ compiler?)")
    with cpu_kernels.simd_loops(request.param):
        yield request.param
