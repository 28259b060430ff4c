"""Fixtures shared by the MoE tests."""

from __future__ import annotations

import pytest

from workbench.moe import cpu_kernels


@pytest.fixture(params=["fused_cpu", "grouped_mm"])
def expert_kernel(request):
    """Run a test once with the fused CPU expert kernel and once without it (F.grouped_mm / bmm)."""
    if request.param == "fused_cpu" and not cpu_kernels.kernel_available():
        pytest.skip("the fused CPU expert kernel cannot be built here (no C++ compiler?)")
    with cpu_kernels.fused_cpu_kernel(request.param == "fused_cpu"):
        yield request.param


@pytest.fixture(params=[True, False], ids=["avx2 loops", "plain loops"])
def simd(request):
    """Run a kernel test with the kernels' AVX2 loops (where this CPU has them) and with the plain
    loops that other CPUs run (``cpu_kernels.simd_loops``)."""
    if not cpu_kernels.kernel_available():
        pytest.skip("the fused CPU kernels cannot be built here (no C++ compiler?)")
    with cpu_kernels.simd_loops(request.param):
        yield request.param
