"""Fused CPU kernels for the MoE layer, applied to a built model by ``convert``.

    model = MoELM(cfg)            # converted when built, unless WORKBENCH_FUSED_CPU=0
    convert(model)                # or by hand: the same model, fused subclasses swapped in

- ``build``: compiling and loading the C++ extension (``csrc/``), and the two switches
  (``fused_cpu_kernel`` / ``WORKBENCH_FUSED_CPU``, ``simd_loops`` / ``WORKBENCH_CPU_SIMD``)
- ``ops``: the kernels as autograd ops
- ``modules``: fused subclasses of the readable router, experts and layer, and the fused
  sorted dispatch; each falls back to its readable parent where its kernel does not fit
- ``convert``: the exact-class map and ``convert(model)``
"""

from workbench.kernels.cpu.build import enabled, fused_cpu_kernel, kernel_available, load_kernel, simd_loops
from workbench.kernels.cpu.convert import FUSED_CLASSES, convert, convert_if_enabled

__all__ = ["FUSED_CLASSES", "convert", "convert_if_enabled", "enabled", "fused_cpu_kernel", "kernel_available",
           "load_kernel", "simd_loops"]
