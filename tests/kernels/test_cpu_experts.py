"""The fused CPU expert kernel computes the readable reference's function, whatever the threads,
with its AVX2 loops and with the plain ones (the `simd` fixture).

The kernel cuts the rows into one range per thread, so an expert can be split between threads
(its weight gradient is then a sum of partial sums); the tests choose row counts and thread
numbers that produce every case: empty experts, an expert spanning all threads, one thread.
Tolerances as for the dispatches: outputs 1e-5, gradients 1e-4 (max abs error, fp32).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tests.kernels.conftest import needs_kernel
from tests.moe.helpers import random_routing
from workbench.kernels.cpu import build, convert, ops
from workbench.kernels.cpu.modules import experts_fit, fused_sorted_dispatch
from workbench.moe import SwiGLUExperts
from workbench.moe.dispatch import loop_dispatch

OUT_TOL, GRAD_TOL = 1e-5, 1e-4


def make_experts(E: int, D: int, H: int) -> SwiGLUExperts:
    experts = SwiGLUExperts(E, D, H)
    experts.reset_parameters(std=D**-0.5, out_std=H**-0.5)  # O(1) outputs: errors are not trivially small
    return experts


def reference_grouped(experts: SwiGLUExperts, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.cat([experts.forward_one(e, x_e) for e, x_e in enumerate(x_ND.split(counts))])


def outputs_and_grads(fn, x, experts):
    x = x.clone().requires_grad_()
    y = fn(x)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    return y, torch.autograd.grad(y, [x, experts.w1, experts.w3, experts.w2], grad_y)


COUNTS = {
    "balanced": [23, 31, 17, 29, 20, 24],
    "empty experts": [0, 50, 0, 44, 50, 0],
    "one expert takes all": [0, 0, 144, 0, 0, 0],
    "tiny groups": [1, 1, 140, 1, 1, 0],
}


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("case", COUNTS)
def test_fused_experts_match_the_reference_for_every_thread_partition(case, threads, simd):
    counts = COUNTS[case]
    experts = make_experts(len(counts), 24, 40)
    x = torch.randn(sum(counts), 24)
    y_ref, g_ref = outputs_and_grads(lambda v: reference_grouped(experts, v, counts), x, experts)
    y, g = outputs_and_grads(lambda v: ops.fused_swiglu_experts(v, experts.w1, experts.w3, experts.w2, counts),
                                 x, experts)
    assert y_ref.abs().max() > 0.1
    assert (y - y_ref).abs().max() <= OUT_TOL
    for a, b, what in zip(g, g_ref, ["x", "w1", "w3", "w2"], strict=True):
        assert (a - b).abs().max() <= GRAD_TOL, f"gradient of {what}"
    for e, n in enumerate(counts):  # an expert without rows gets exactly zero
        if n == 0:
            assert all(gw[e].abs().max() == 0 for gw in g[1:])


@needs_kernel
@pytest.mark.parametrize("scale", [1e-3, 30.0], ids=["gates near 0", "gates up to hundreds (silu saturated)"])
def test_fused_swiglu_holds_where_the_sigmoid_saturates_or_vanishes(scale, simd):
    """The kernel's vectorised sigmoid (e^-g clamped where it leaves the floats) against the
    reference: pre-activations of ~1e-3, and of ~100 where sigmoid is 0 or 1 to fp32; errors
    relative to the values' size."""
    counts = [64, 0, 37, 91]
    experts = make_experts(len(counts), 16, 40)
    x = torch.randn(sum(counts), 16) * scale
    gates = torch.cat([x_e @ experts.w1[e] for e, x_e in enumerate(x.split(counts))])
    assert gates.abs().max() > (50 if scale > 1 else 0)
    y_ref, g_ref = outputs_and_grads(lambda v: reference_grouped(experts, v, counts), x, experts)
    y, g = outputs_and_grads(lambda v: ops.fused_swiglu_experts(v, experts.w1, experts.w3, experts.w2, counts),
                                 x, experts)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    for a, b, what in zip(g, g_ref, ["x", "w1", "w3", "w2"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=f"gradient of {what}")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("E,K", [(8, 2), (4, 1), (6, 3), (1, 1)])
def test_fused_sorted_dispatch_matches_the_loop_reference(E, K, threads, simd):
    """The permute-experts-combine op, routing weights' gradient included."""
    T, D, H = 90, 32, 48
    experts = convert(make_experts(E, D, H))
    x = torch.randn(T, D)
    routing = random_routing(T, E, K, requires_grad=True)

    def run(dispatch):
        x_ = x.clone().requires_grad_()
        y, _ = dispatch(x_, routing, experts)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
        return y, torch.autograd.grad(y, [x_, routing.weights_TK, experts.w1, experts.w3, experts.w2], grad_y)

    y_ref, g_ref = run(loop_dispatch)
    y, g = run(fused_sorted_dispatch)
    assert type(y.grad_fn).__name__ == "_FusedSortedExpertsBackward"  # the fused op ran
    assert (y - y_ref).abs().max() <= OUT_TOL
    for a, b, what in zip(g, g_ref, ["x", "weights", "w1", "w3", "w2"], strict=True):
        assert (a - b).abs().max() <= GRAD_TOL, f"gradient of {what}"


@needs_kernel
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_fused_kernel_is_deterministic(threads):
    """The row partition is fixed by the counts, not by timing: repeated runs agree bit for bit."""
    counts = [40, 0, 77, 13, 60]
    experts = make_experts(len(counts), 16, 32)
    x = torch.randn(sum(counts), 16)
    fused = lambda v: ops.fused_swiglu_experts(v, experts.w1, experts.w3, experts.w2, counts)
    first, second = outputs_and_grads(fused, x, experts), outputs_and_grads(fused, x, experts)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


@needs_kernel
def test_fused_kernel_rejects_inconsistent_inputs_with_a_clear_error():
    kernel = build.load_kernel()
    experts = make_experts(3, 8, 16)
    w = (experts.w1.detach(), experts.w3.detach(), experts.w2.detach())
    with pytest.raises(RuntimeError, match="counts must be >= 0 and add up to the number of rows"):
        kernel.swiglu_experts_forward(torch.randn(10, 8), None, *w, [3, 3, 3])
    with pytest.raises(RuntimeError, match="inner dimensions disagree"):
        kernel.swiglu_experts_forward(torch.randn(9, 7), None, *w, [3, 3, 3])
    with pytest.raises(RuntimeError, match="one count per expert"):
        kernel.swiglu_experts_forward(torch.randn(9, 8), None, *w, [9])


def test_without_a_compiler_the_experts_fall_back_with_one_warning(monkeypatch, tmp_path):
    """A kernel that cannot be built (here: a source that does not compile) leaves a converted
    module computing the same function with F.grouped_mm, and says so once."""
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "this build is meant to fail"\n')
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(build, "_SOURCES", [broken])
    monkeypatch.setattr(build, "_module", None)
    monkeypatch.setattr(build, "_build_failed", False)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert build.load_kernel() is None
    counts = [5, 0, 7]
    experts = convert(make_experts(3, 8, 16))
    x = torch.randn(12, 8)
    assert not experts_fit(x, experts.w1)  # and no second warning or build
    torch.testing.assert_close(experts.forward_grouped(x, counts), reference_grouped(experts, x, counts),
                               atol=OUT_TOL, rtol=0)


def test_environment_switch_builds_the_readable_model():
    code = ("from workbench.config import preset; from workbench.model import MoELM; "
            "print(sorted({type(m).__name__ for m in MoELM(preset('tiny')).modules() if 'Fused' in type(m).__name__}))")
    outputs = {}
    for value in ("0", "1"):
        env = {**os.environ, "WORKBENCH_FUSED_CPU": value}
        outputs[value] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True, stdin=subprocess.DEVNULL).stdout.strip()
    assert outputs["0"] == "[]"
    assert outputs["1"] == "['FusedMoELayer', 'FusedSoftmaxTopKRouter', 'FusedSwiGLUExperts']"


@needs_kernel
def test_fused_sorted_dispatch_runs_bf16_weights_close_to_fp32():
    """A model cast to bf16 (no autocast) also takes the kernel; it tracks the fp32 reference to bf16 precision."""
    T, D, H, E, K = 64, 32, 48, 4, 2
    experts = make_experts(E, D, H)
    x = torch.randn(T, D)
    routing = random_routing(T, E, K)
    y_ref, _ = loop_dispatch(x, routing, experts)
    experts_bf16 = convert(make_experts(E, D, H).to(torch.bfloat16))
    experts_bf16.load_state_dict(experts.state_dict())
    assert experts_fit(x.bfloat16(), experts_bf16.w1)
    y, _ = fused_sorted_dispatch(x.bfloat16(), routing, experts_bf16)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ == "_FusedSortedExpertsBackward"
    torch.testing.assert_close(y.float(), y_ref, atol=0.05, rtol=0.05)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-way leaves torch's lock file behind, which would block every later load."""
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.touch()
    fresh.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        build._remove_stale_lock(stale)
    build._remove_stale_lock(fresh)
    assert not stale.exists() and fresh.exists()


def test_the_build_folder_is_keyed_by_environment_torch_version_and_source(monkeypatch, tmp_path):
    """torch's build file records the environment's absolute paths, so two virtual environments
    sharing one build folder would rebuild it in turn: each environment gets its own folder,
    and one environment always finds the same one."""
    name = build._extension_name()
    assert name == build._extension_name()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    other = build._extension_name()
    assert other != name and other.rsplit("_env", 1)[0] == name.rsplit("_env", 1)[0]
    monkeypatch.setattr(build, "_SOURCES", [*build._SOURCES[:-1], tmp_path / "changed.cpp"])
    (tmp_path / "changed.cpp").write_text("// another kernel source\n")
    assert build._extension_name().rsplit("_env", 1)[0] != name.rsplit("_env", 1)[0]
