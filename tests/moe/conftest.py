"""Fixtures shared by the MoE tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from workbench.kernels import cpu as cpu_kernels
from workbench.kernels.cpu.modules import fused_sorted_dispatch
from workbench.moe import DISPATCHES


@dataclass
class ExpertKernel:
    """How a test runs its experts: ``fused_cpu`` converts the modules it is given to the fused CPU
    kernels (``workbench.kernels.cpu.convert``) and runs ``sorted`` as the fused sorted dispatch;
    ``grouped_mm`` leaves the readable modules as they are (F.grouped_mm / bmm)."""

    name: str

    @property
    def fused(self) -> bool:
        return self.name == "fused_cpu"

    def convert(self, module: torch.nn.Module) -> torch.nn.Module:
        return cpu_kernels.convert(module) if self.fused else module

    def dispatch(self, name: str):
        return fused_sorted_dispatch if self.fused and name == "sorted" else DISPATCHES[name]


@pytest.fixture(params=["fused_cpu", "grouped_mm"])
def expert_kernel(request):
    """Run a test once with the fused CPU expert kernel and once without it (F.grouped_mm / bmm)."""
    if request.param == "fused_cpu" and not cpu_kernels.kernel_available():
        pytest.skip("the fused CPU expert kernel cannot be built here (no C++ compiler?)")
    return ExpertKernel(request.param)

