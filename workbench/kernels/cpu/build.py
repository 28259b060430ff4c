"""Building and loading the fused CPU kernels, and the two switches that govern them.

The kernels (``csrc/``) are compiled with ``torch.utils.cpp_extension`` the first time one is
needed (about a minute, once per environment, torch version and source; the build lives under
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). Where no C++ compiler is found the
build fails, a warning says why once, and every converted module takes its readable path: the
same function, a little slower.

- ``WORKBENCH_FUSED_CPU=0`` (or :func:`fused_cpu_kernel`) keeps models from being converted
  when they are built (``workbench.kernels.cpu.convert_if_enabled``): the pure PyTorch model.
- ``WORKBENCH_CPU_SIMD=0`` (or :func:`simd_loops`) keeps the kernels off their AVX2 loops: the
  plain loops that other CPUs run.
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

# the kernels and their bindings, built as one extension, and the header they share
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("swiglu_experts_cpu.cpp", "routing_cpu.cpp", "extension.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / "vec_math.h"]
_ENV_SWITCH = "WORKBENCH_FUSED_CPU"

_enabled = os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")
_module: ModuleType | None = None
_build_failed = False
_lock = threading.Lock()


def enabled() -> bool:
    """Whether models are converted to the fused kernels when they are built."""
    return _enabled


@contextlib.contextmanager
def fused_cpu_kernel(enabled: bool) -> Iterator[None]:
    """Build models with (or without) the fused kernels inside a ``with`` block: benchmarks and
    tests build both. A model already built keeps what it was built with."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


@contextlib.contextmanager
def simd_loops(enabled: bool) -> Iterator[None]:
    """Let the kernels' AVX2 loops run (where the CPU has them) or take the plain loops inside a
    ``with`` block; the tests check both against the reference. Needs the built kernels."""
    kernel = require_kernel()
    previous = kernel.simd_allowed()
    kernel.set_simd(enabled)
    try:
        yield
    finally:
        kernel.set_simd(previous)


def _extension_name() -> str:
    """One build per environment, torch version and kernel source.

    An extension only fits the torch it was built against, and torch's build file records the
    absolute paths of the environment (its include and library folders): two virtual
    environments sharing one build folder would each find the other's build stale and rebuild
    in turn, while every other process waited on the build lock. So the interpreter prefix is
    part of the key, and clones that share an environment (and a source) share one build.
    """
    source_hash = hashlib.sha1(b"".join(source.read_bytes() for source in _SOURCES + _HEADERS)).hexdigest()[:10]
    env_hash = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]
    torch_version = re.sub(r"\W", "_", torch.__version__)
    return f"workbench_cpu_kernels_{torch_version}_{source_hash}_env{env_hash}"


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
            print(f"workbench: compiling the CPU kernels, about a minute, once (per environment, torch version "
                  f"and kernel source; in {build_dir})", file=sys.stderr, flush=True)
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            # Compile a copy kept in the build folder: its path is the same for every checkout
            # with this source, so two clones in one environment share one build.
            _remove_stale_lock(build_dir / "lock")
            sources = [build_dir / source.name for source in _SOURCES]
            for original in _SOURCES + _HEADERS:
                copy = build_dir / original.name
                if not copy.exists():
                    tmp = copy.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_bytes(original.read_bytes())
                    tmp.replace(copy)
            _module = load(name, [str(source) for source in sources], extra_cflags=["-O3", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
        except Exception as err:  # no compiler, no ninja, a read-only cache, ...: the fallback is exact
            _build_failed = True
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            warnings.warn(f"the fused CPU kernels could not be built ({reason}); the model runs its readable "
                          "PyTorch code instead (same results, a little slower). Set "
                          f"{_ENV_SWITCH}=0 to skip the build.", RuntimeWarning, stacklevel=3)
    return _module


def kernel_available() -> bool:
    """Whether the fused kernels are built (building them if needed)."""
    return load_kernel() is not None


def require_kernel() -> ModuleType:
    """The built extension; raises where it is not available (check ``kernel_available()`` first)."""
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("the fused CPU kernels are not available; check kernel_available() first")
    return kernel
