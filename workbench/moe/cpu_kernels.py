"""A fused CPU kernel for the SwiGLU experts, built on first use, with a plain-PyTorch fallback.

``csrc/swiglu_experts_cpu.cpp`` cuts the rows (sorted by expert) into one equal range per
intra-op thread, and each thread runs the whole expert FFN (forward: three GEMMs and the
SwiGLU; backward: six GEMMs) on its part of every expert, with single-threaded GEMMs. On a
few CPU cores that beats one grouped GEMM per weight matrix, whose small per-expert products
are split across every thread, and keeps each expert's activations in cache between its GEMMs
(see the layer benchmark in the README for measured figures).

The kernel is compiled with ``torch.utils.cpp_extension`` the first time it is needed (about
30 s, once per torch version; the build lives under ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Where no C++ compiler is found the build fails, a warning says
why once, and ``SwiGLUExperts`` keeps using ``grouped_matmul``: same function, a little slower.
Set ``WORKBENCH_FUSED_CPU=0`` (or use :func:`fused_cpu_kernel`) to turn the kernel off.

Shape legend: N routed rows sorted by expert, D model dim, H expert hidden, E experts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

_SOURCE = Path(__file__).parent / "csrc" / "swiglu_experts_cpu.cpp"
_ENV_SWITCH = "WORKBENCH_FUSED_CPU"

_enabled = os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")
_module: ModuleType | None = None
_build_failed = False
_lock = threading.Lock()


@contextlib.contextmanager
def fused_cpu_kernel(enabled: bool) -> Iterator[None]:
    """Turn the fused kernel on or off inside a ``with`` block (benchmarks and tests compare both)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def _extension_name() -> str:
    # one build per torch version (an extension only fits the torch it was built against) and source
    source_hash = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:10]
    torch_version = re.sub(r"\W", "_", torch.__version__)
    return f"workbench_swiglu_cpu_{torch_version}_{source_hash}"


def _remove_stale_lock(lock: Path, max_age_s: float = 600.0) -> None:
    """torch's build lock outlives a build that was killed, and then every later load waits on
    it forever; a build takes about 30 s, so a lock this old belongs to no live build."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            warnings.warn(f"removed a stale build lock left by an interrupted build: {lock}", RuntimeWarning,
                          stacklevel=4)


def load_kernel() -> ModuleType | None:
    """The compiled extension, building it on first call; None where it cannot be built."""
    global _module, _build_failed
    if _module is not None or _build_failed:
        return _module
    with _lock:
        if _module is not None or _build_failed:
            return _module
        from torch.utils.cpp_extension import get_default_build_root, load

        name = _extension_name()
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        if not (build_dir / f"{name}.so").exists():
            print(f"workbench: building the fused CPU expert kernel in {build_dir} "
                  "(once per torch version and kernel source, about 30 s)", file=sys.stderr, flush=True)
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            # Compile a copy kept in the build folder: its path is the same for every checkout
            # with this source, so two clones share one build instead of rebuilding in turn.
            _remove_stale_lock(build_dir / "lock")
            source = build_dir / _SOURCE.name
            if not source.exists():
                tmp = source.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(_SOURCE.read_bytes())
                tmp.replace(source)
            _module = load(name, [str(source)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           build_directory=str(build_dir))
        except Exception as err:  # no compiler, no ninja, a read-only cache, ...: the fallback is exact
            _build_failed = True
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            warnings.warn(f"the fused CPU expert kernel could not be built ({reason}); the experts run "
                          f"with F.grouped_mm instead (same results, a little slower). Set {_ENV_SWITCH}=0 "
                          "to skip the build.", RuntimeWarning, stacklevel=3)
    return _module


def kernel_available() -> bool:
    """Whether the fused kernel is switched on and built (building it if needed)."""
    return _enabled and load_kernel() is not None


def fused_kernel_applies(x_ND: torch.Tensor, w_EDH: torch.Tensor) -> bool:
    """Whether ``SwiGLUExperts`` should run these rows with the fused kernel.

    Yes for CPU floating-point rows and weights of one dtype, outside autocast. The kernel
    gives every thread an equal share of the rows, so it needs no balanced routing.
    """
    if not _enabled or x_ND.device.type != "cpu" or not x_ND.dtype.is_floating_point or x_ND.dtype != w_EDH.dtype:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return load_kernel() is not None


class _FusedSwiGLUExperts(torch.autograd.Function):
    """The experts on rows already sorted by expert: ``out = SwiGLU_e(x)`` row by row."""

    @staticmethod
    def forward(ctx, x_ND, w1_EDH, w3_EDH, w2_EHD, counts):
        out_ND, gate_NH, up_NH = require_kernel().swiglu_experts_forward(x_ND, None, w1_EDH, w3_EDH, w2_EHD, counts)
        ctx.save_for_backward(x_ND, gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD)
        ctx.counts = counts
        return out_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND):
        x_ND, gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD = ctx.saved_tensors
        grad_x_ND, _, *grad_weights = require_kernel().swiglu_experts_backward(
            grad_ND.contiguous(), x_ND, None, None, None, gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD, ctx.counts)
        return grad_x_ND, *grad_weights, None


def require_kernel() -> ModuleType:
    """The built extension; raises where it is not available (check ``fused_kernel_applies`` first)."""
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("the fused CPU expert kernel is not available; check fused_kernel_applies() first")
    return kernel


def fused_swiglu_experts(x_ND: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                         counts: list[int]) -> torch.Tensor:
    """``out[rows of e] = (silu(x_e w1[e]) * (x_e w3[e])) w2[e]``, rows sorted by expert, ``counts[e]`` each."""
    require_kernel()
    tensors = [t.contiguous() for t in (x_ND, w1_EDH, w3_EDH, w2_EHD)]
    return _FusedSwiGLUExperts.apply(*tensors, [int(c) for c in counts])

