"""Fused CPU kernels for the experts and the routing around them, built on first use, each with
the readable PyTorch code it replaces as the fallback.

``csrc/swiglu_experts_cpu.cpp`` cuts the rows (sorted by expert) into one equal range per
intra-op thread, and each thread runs the whole expert FFN (forward: three GEMMs and the
SwiGLU; backward: six GEMMs) on its part of every expert, with single-threaded GEMMs. On a
few CPU cores that beats one grouped GEMM per weight matrix, whose small per-expert products
are split across every thread, and keeps each expert's activations in cache between its GEMMs
(see the layer benchmark in the README for measured figures).

``csrc/routing_cpu.cpp`` does the per-token work around the experts in one pass each: the
softmax top-k router (gate, softmax, selection and gates, forward and backward), the counting
sort of the token-expert pairs, the Switch auxiliary loss, the values of the balancing losses
that are only reported, and two routing metrics (router confidence, gate mass). At the
workbench's sizes (thousands of tokens, 8 experts) the dozens of small ATen ops these replace
cost more in dispatch than in arithmetic; together they were about a tenth of a ``tiny``
training step.

The hot loops (the gate's products, the softmax's exp, the SwiGLU's element-wise steps) have
AVX2 + FMA versions, compiled per function and chosen at run time (``csrc/vec_math.h``), so one
build runs on any x86-64 CPU and elsewhere the plain loops or ATen ops run (``WORKBENCH_CPU_SIMD=0``
or :func:`simd_loops` forces those).

The kernels are compiled with ``torch.utils.cpp_extension`` the first time one is needed (about
a minute, once per environment, torch version and source; the build lives under
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). Where no C++ compiler is found the
build fails, a warning says why once, and every caller takes its readable path: the same
function, a little slower. Set ``WORKBENCH_FUSED_CPU=0`` (or use :func:`fused_cpu_kernel`) to
turn the kernels off.

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
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

from workbench.moe.permutation import SortedPairs, combine, in_pair_order, sum_rows_per_token

if TYPE_CHECKING:
    from workbench.moe.routers import RouterOutput

# the kernels and their bindings, built as one extension, and the header they share
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("swiglu_experts_cpu.cpp", "routing_cpu.cpp", "extension.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / "vec_math.h"]
_ENV_SWITCH = "WORKBENCH_FUSED_CPU"

_enabled = os.environ.get(_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")
_module: ModuleType | None = None
_build_failed = False
_lock = threading.Lock()


@contextlib.contextmanager
def fused_cpu_kernel(enabled: bool) -> Iterator[None]:
    """Turn the fused kernels on or off inside a ``with`` block (benchmarks and tests compare both)."""
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
            print(f"workbench: building the fused CPU kernels in {build_dir} (once per environment, "
                  "torch version and kernel source, about a minute)", file=sys.stderr, flush=True)
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
            warnings.warn(f"the fused CPU kernels could not be built ({reason}); the experts run with "
                          "F.grouped_mm and the routing with plain PyTorch ops instead (same results, a little "
                          f"slower). Set {_ENV_SWITCH}=0 to skip the build.", RuntimeWarning, stacklevel=3)
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


def fused_sorted_applies(x_TD: torch.Tensor, routing: RouterOutput, experts: torch.nn.Module) -> bool:
    """Whether the sorted dispatch hands its permute, experts and combine to ``fused_sorted_experts``:
    on CPU (``fused_kernel_applies``), for routing without padding slots (not expert choice)."""
    return routing.mask_TK is None and fused_kernel_applies(x_TD, experts.w1)


def fused_sorted_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, experts: torch.nn.Module,
                         pairs: SortedPairs) -> torch.Tensor:
    """(T, D): ``y_t = sum_k w_tk * expert_{e_tk}(x_t)`` in one op, rows sorted as ``pairs`` says."""
    return _FusedSortedExperts.apply(x_TD.contiguous(), weights_TK.contiguous(), experts.w1.contiguous(),
                                     experts.w3.contiguous(), experts.w2.contiguous(), pairs.sorted_to_pair_N,
                                     pairs.pair_to_sorted_N, pairs.counts)


def require_kernel() -> ModuleType:
    """The built extension; raises where it is not available (check ``fused_kernel_applies`` first)."""
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("the fused CPU kernels are not available; check fused_kernel_applies() first")
    return kernel


def fused_swiglu_experts(x_ND: torch.Tensor, w1_EDH: torch.Tensor, w3_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                         counts: list[int]) -> torch.Tensor:
    """``out[rows of e] = (silu(x_e w1[e]) * (x_e w3[e])) w2[e]``, rows sorted by expert, ``counts[e]`` each."""
    require_kernel()
    tensors = [t.contiguous() for t in (x_ND, w1_EDH, w3_EDH, w2_EHD)]
    return _FusedSwiGLUExperts.apply(*tensors, [int(c) for c in counts])


class _FusedSortedExperts(torch.autograd.Function):
    """Permute, experts, un-permute and combine in one op, with the fused CPU kernel.

    Row n of the experts' input is token ``sorted_to_pair[n] // K``; the kernel gathers each
    thread's rows itself, and its backward gathers the output gradient, weights it and computes
    the routing weights' gradient in the same pass (what ``permutation.permute`` and
    ``permutation.unpermute_combine`` do in separate steps), so no sorted copy of x or of the gradient is
    written to memory. Every pair must be a real assignment (no slot mask).
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1_EDH, w3_EDH, w2_EHD, sorted_to_pair_N, pair_to_sorted_N, counts):
        token_of_row_N = sorted_to_pair_N // weights_TK.shape[1]
        out_sorted_ND, gate_NH, up_NH = require_kernel().swiglu_experts_forward(
            x_TD, token_of_row_N, w1_EDH, w3_EDH, w2_EHD, counts)
        ctx.save_for_backward(x_TD, weights_TK, sorted_to_pair_N, pair_to_sorted_N, token_of_row_N, out_sorted_ND,
                              gate_NH, up_NH, w1_EDH, w3_EDH, w2_EHD)
        ctx.counts = counts
        return combine(out_sorted_ND, pair_to_sorted_N.view_as(weights_TK), weights_TK)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        (x_TD, weights_TK, sorted_to_pair_N, pair_to_sorted_N, token_of_row_N, out_sorted_ND, gate_NH, up_NH,
         w1_EDH, w3_EDH, w2_EHD) = ctx.saved_tensors
        weight_of_row_N = weights_TK.flatten().index_select(0, sorted_to_pair_N).to(x_TD.dtype)
        grad_rows_ND, grad_weight_of_row_N, *grad_expert_weights = require_kernel().swiglu_experts_backward(
            grad_TD.contiguous(), x_TD, token_of_row_N, weight_of_row_N, out_sorted_ND, gate_NH, up_NH,
            w1_EDH, w3_EDH, w2_EHD, ctx.counts)
        grad_x_TD = sum_rows_per_token(grad_rows_ND, pair_to_sorted_N, weights_TK.shape[1])
        grad_weights_TK = (in_pair_order(grad_weight_of_row_N, sorted_to_pair_N)
                           .view_as(weights_TK).to(weights_TK.dtype))
        return grad_x_TD, grad_weights_TK, *grad_expert_weights, None, None, None


# --- routing: the softmax top-k router and the sort of its pairs ---------------------------


def _fp32_cpu_kernel_applies(*tensors: torch.Tensor) -> bool:
    """The routing kernels' common condition: switched on, built, and every tensor fp32 on the CPU."""
    if not _enabled or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return load_kernel() is not None


def fused_router_applies(x32_TD: torch.Tensor, weight_ED: torch.Tensor) -> bool:
    """Whether ``SoftmaxTopKRouter`` should route with ``fused_softmax_topk``: fp32 CPU input and gate."""
    return _fp32_cpu_kernel_applies(x32_TD, weight_ED)


class _FusedSoftmaxTopK(torch.autograd.Function):
    """``logits = x W^T``, ``probs = softmax(logits)``, top-k of ``probs + bias``, gates: one op.

    The same function as ``Router.gate_logits`` + ``SoftmaxTopKRouter.route`` + ``Router.gates``;
    the backward takes whichever of the logits', probabilities' and gates' gradients arrived
    (the balancing losses read the first two, the dispatch the third) in one pass per token.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_ED, bias_E, k, normalize):
        logits_TE, probs_TE, ids_TK, gates_TK = require_kernel().softmax_topk_forward(
            x_TD, weight_ED, bias_E, k, normalize)
        ctx.save_for_backward(x_TD, weight_ED, probs_TE, ids_TK, gates_TK)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # an output no loss read passes None, not a tensor of zeros
        return logits_TE, probs_TE, ids_TK, gates_TK

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits_TE, grad_probs_TE, _grad_ids, grad_gates_TK):
        x_TD, weight_ED, probs_TE, ids_TK, gates_TK = ctx.saved_tensors
        grad_x_TD, grad_weight_ED = require_kernel().softmax_topk_backward(
            grad_logits_TE, grad_probs_TE, grad_gates_TK, x_TD, weight_ED, probs_TE, ids_TK, gates_TK, ctx.normalize)
        return grad_x_TD, grad_weight_ED, None, None, None


def fused_softmax_topk(x32_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, k: int,
                       normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (T, E), probs (T, E), expert ids (T, K), gates (T, K)) of softmax top-k routing:
    selection by ``probs + bias``, gates the selected probabilities (renormalised when ``normalize``).
    The K ids of a token come in descending order of ``probs + bias``."""
    return _FusedSoftmaxTopK.apply(x32_TD.contiguous(), weight_ED.contiguous(), bias_E, k, normalize)


def sort_pairs_by_expert(expert_ids_TK: torch.Tensor, num_experts: int) -> SortedPairs:
    """``permutation.sort_pairs_by_expert`` for routing without padding slots, as one counting sort."""
    T, K = expert_ids_TK.shape
    sorted_to_pair_N, pair_to_sorted_N, tokens_per_expert = require_kernel().sort_pairs_by_expert(
        expert_ids_TK.contiguous(), num_experts)
    counts = tokens_per_expert.tolist()
    return SortedPairs(sorted_to_pair_N, pair_to_sorted_N, tokens_per_expert, counts, T * K, K)


def balance_loss_values_apply(routing: RouterOutput, padding_mask: torch.Tensor | None) -> bool:
    """Whether ``balance_loss_values`` applies: fp32 CPU routing without padding tokens or slots."""
    unpadded = padding_mask is None and routing.mask_TK is None
    return unpadded and _fp32_cpu_kernel_applies(routing.scores_TE, routing.logits_TE)


def balance_loss_values(routing: RouterOutput, num_sequences: int) -> dict[str, torch.Tensor]:
    """The values of ``balance.switch_aux_loss`` (this micro-batch), ``balance.sequence_aux_loss`` and
    ``balance.router_z_loss``, in one pass and without a graph: for the losses that are only reported."""
    values = require_kernel().balance_loss_values(routing.scores_TE.detach().contiguous(),
                                                  routing.expert_ids_TK.contiguous(),
                                                  routing.logits_TE.detach().contiguous(), num_sequences)
    return dict(zip(("aux_loss", "seq_aux_loss", "z_loss"), values.unbind(), strict=True))


def routing_summary_applies(routing: RouterOutput) -> bool:
    """Whether ``confidence_and_gate_mass`` applies: fp32 CPU scores and weights, no padding slots."""
    return routing.mask_TK is None and _fp32_cpu_kernel_applies(routing.scores_TE, routing.weights_TK)


def confidence_and_gate_mass(routing: RouterOutput) -> tuple[float, list[float]]:
    """(router confidence, each expert's summed combine weight) as ``metrics.routing_metrics``
    computes them, in one pass."""
    values = require_kernel().confidence_and_gate_mass(routing.scores_TE.detach().contiguous(),
                                                       routing.expert_ids_TK.contiguous(),
                                                       routing.weights_TK.detach().contiguous()).tolist()
    return values[0], values[1:]


def fused_aux_applies(scores_TE: torch.Tensor) -> bool:
    """Whether ``balance.switch_aux_loss`` without masks runs as ``fused_switch_aux_loss``: fp32 CPU scores."""
    return _fp32_cpu_kernel_applies(scores_TE)


class _FusedSwitchAux(torch.autograd.Function):
    """``balance.switch_aux_loss`` without masks: one pass forward, one backward (closed form)."""

    @staticmethod
    def forward(ctx, scores_TE, expert_ids_TK):
        loss, f_E = require_kernel().switch_aux_forward(scores_TE, expert_ids_TK)
        ctx.save_for_backward(scores_TE, f_E)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        scores_TE, f_E = ctx.saved_tensors
        return require_kernel().switch_aux_backward(grad, scores_TE, f_E), None


def fused_switch_aux_loss(scores_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """``balance.switch_aux_loss(scores_TE, expert_ids_TK)`` (no masks) with the fused CPU kernel."""
    return _FusedSwitchAux.apply(scores_TE.contiguous(), expert_ids_TK.contiguous())
