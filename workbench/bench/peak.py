"""The matmul peak of this machine, measured now: the denominator of model FLOP utilisation."""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                        repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a ``size`` x ``size`` x ``size`` matmul (2 n^3 FLOPs each).

    The best rather than the median: the peak is what the hardware can do, and noise only
    ever slows a run down.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = _synchronizer(device)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def measure_copy_bandwidth(device: str | torch.device = "cpu", nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s of copying an ``nbytes`` fp32 tensor (each byte read once and
    written once, so 2 x ``nbytes`` move per copy): the bandwidth roof of the throughput model.
    256 MiB by default, well past a CPU's last-level cache."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    sync = _synchronizer(device)
    dst.copy_(src)  # warm-up: pages touched
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def _synchronizer(device: torch.device):
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "npu":  # torch_npu registers torch.npu once imported
        return torch.npu.synchronize  # type: ignore[attr-defined]
    return lambda: None
