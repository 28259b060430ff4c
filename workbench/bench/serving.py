"""An analytic model of MoE serving: prefill and decode on the roofline, beside the training model.

It shares the training model's device table (``devices.yaml``) and shapes (``perfmodel.SHAPES``), and
predicts, per device:

- **Prefill** of ``batch`` prompts of ``prompt_len`` tokens: the training model's forward roofline
  (``perfmodel.predict(..., backward=False)``) over the ``batch x prompt_len`` tokens, with the
  attention core counted over the keys a causal query meets on average, ``(L + 1) / 2`` (the training
  model counts the full ``L x L`` product), plus the time to write the prompt's KV cache to memory; its
  all-to-all overlaps compute as decode's does (below).
- **Decode**, one step of ``batch`` sequences at KV length ``context`` (Pope et al., "Efficiently
  Scaling Transformer Inference", MLSys 2023, section 2: a decode step reads every weight it uses and
  the whole KV cache once). Each part is on the roofline, ``t = max(FLOPs / compute, bytes / bandwidth)``,
  and the step is their sum:
    - attention weights, read once per step (data-parallel attention: every device holds them);
    - the KV cache, ``B x L x`` bytes per token (``kv_bytes_per_token``): MHA / GQA keep ``2 n_kv d_h``
      elements per token and layer, MLA only its compressed latent and RoPE key ``d_c + d_R``
      (DeepSeek-V2, arXiv 2405.04434, section 2.1); MLA decodes with the up-projections absorbed, so
      its attention core multiplies in the latent space: ``n_h (2 d_c + d_R)`` multiply-adds per key;
    - the routed experts a step touches: the expected number of distinct experts per layer
      (``expected_distinct_experts``) under uniform or measured routing, each read in full, on the
      device's share ``(E + R) / P`` of the expert slots;
    - shared experts, dense layers, routers and the LM head, read once per step;
    - all-to-all per MoE layer at expert-parallel degree ``P``: dispatch and combine of ``B k D`` rows
      each, ``(1 - 1/P)`` of them off the device, at the table's intra- / inter-node bandwidths plus a
      fixed latency per exchange (``t = latency + bytes / bandwidth``); ``overlap`` of it hidden behind
      compute.
  Tokens/s per device ``= B x (tokens per step) / step``; time per output token (TPOT) ``= step /
  (tokens per step)``; ``tokens per step`` is 1, or ``1 + a + a^2 + ...`` with multi-token prediction
  (``mtp_tokens`` drafts verified per step, each accepted with chance ``a``: Leviathan et al., 2023).
- **Maximum batch**: sequences whose KV cache fits in ``memory_fraction`` of the device memory after the
  device's weights (0.9: vLLM's default ``gpu_memory_utilization``).

Weight precision is a parameter (``PRECISION_BYTES``): bf16, fp8 (DeepSeek's serving), int8
(CloudMatrix-Infer's W8A8), int4 (weight-only; the GEMMs then run in bf16).

Not modelled, and so part of the error reported against published figures (``serving_errors``) and
this machine's measurements (``measured_decode_errors``): load imbalance between experts and devices
(the model uses the average device), kernel-launch and framework overheads, activations and
element-wise traffic in decode, tensor parallelism, the weights read twice when a step is split into
two micro-batches, scheduling and queueing, the prefix cache's cost.

Shape legend: B sequences per device, L KV length (context), P expert-parallel degree, E routed
experts, R redundant expert slots, k experts per token, D model width, H expert hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

from workbench.bench import perfmodel as pm
from workbench.validation import check, check_choice, check_int

# bytes per weight; int4 packs two weights per byte
PRECISION_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
MEMORY_FRACTION = 0.9  # share of device memory for weights + KV cache (vLLM's gpu_memory_utilization default)

_PEAK = {"fp32": "fp32_tflops", "bf16": "bf16_tflops", "fp8": "fp8_tflops", "int8": "int8_tflops"}


# --- precisions and roofs -------------------------------------------------------------------------


def compute_dtype(precision: str, dev: pm.Device) -> str:
    """The dtype the GEMMs of ``precision`` weights run in on ``dev``: fp8 / int8 on their own peak when
    the table has one, else (and for int4) weight-only quantization, dequantized to bf16; a device with
    no bf16 figure (this machine) computes in its measured dtype."""
    check_choice("precision", precision, PRECISION_BYTES)
    want = {"fp32": "fp32", "fp16": "bf16", "int4": "bf16"}.get(precision, precision)
    for dtype in (want, "bf16", dev.matmul_dtype):
        if dev.get(_PEAK[dtype]) or dtype == dev.matmul_dtype:
            return dtype
    return dev.matmul_dtype  # pragma: no cover - the loop ends on matmul_dtype


def compute_roof(dev: pm.Device, dtype: str, end: str = "value") -> float:
    """FLOP/s of a large GEMM in ``dtype``: the measured matmul where it was measured in this dtype,
    else the dtype's datasheet peak at the measured matmul's efficiency (``perfmodel.predict``'s rule)."""
    peak = dev.get(_PEAK[dtype], end)
    if pm.DTYPE_BYTES.get(dtype) == pm.DTYPE_BYTES[dev.matmul_dtype] and dev.get("matmul_tflops", end):
        roof = dev.get("matmul_tflops", end)
    else:
        mm, mm_peak = dev.get("matmul_tflops", end), dev.get(_PEAK[dev.matmul_dtype], end)
        roof = (peak or 0) * (mm / mm_peak if (mm and mm_peak) else 1.0)
    check(bool(roof), "device", f"{dev.key} has no {_PEAK[dtype]} or matmul_tflops figure for {dtype} GEMMs",
          dev.key)
    return roof * 1e12


def _bandwidth(dev: pm.Device, end: str) -> float:
    bw = dev.get("hbm_tb_s", end)
    check(bool(bw), "device", f"{dev.key} has no hbm_tb_s figure", dev.key)
    return bw * 1e12


# --- KV cache -------------------------------------------------------------------------------------


def kv_elements_per_token(shp: pm.Shape) -> int:
    """KV-cache elements one token keeps per layer: ``2 n_kv d_h`` (MHA: ``n_kv = n_heads``; GQA), or MLA's
    compressed latent and decoupled RoPE key ``d_c + d_R`` (DeepSeek-V2, arXiv 2405.04434, eq. 9-10)."""
    if shp.attention == "mla":
        return shp.kv_lora_rank + shp.rope_dim
    return 2 * (shp.n_kv_heads or shp.n_heads) * shp.head_dim


def _keys(shp: pm.Shape, layer: int, context: float) -> float:
    """Keys layer ``layer`` keeps / meets at KV length ``context`` (a sliding-window layer: at most its window)."""
    if shp.sliding_window is not None and layer % shp.sliding_every == 0:
        return min(shp.sliding_window, context)
    return context


def kv_bytes_per_token(shp: pm.Shape, kv_precision: str = "bf16") -> float:
    """KV-cache bytes of one token over all layers (full attention; ``kv_cache_bytes`` respects windows)."""
    check_choice("kv_precision", kv_precision, PRECISION_BYTES)
    return shp.n_layers * kv_elements_per_token(shp) * PRECISION_BYTES[kv_precision]


def kv_cache_bytes(shp: pm.Shape, context: float, kv_precision: str = "bf16") -> float:
    """KV-cache bytes of one sequence of ``context`` tokens (sliding-window layers keep their window only)."""
    check_choice("kv_precision", kv_precision, PRECISION_BYTES)
    per = kv_elements_per_token(shp) * PRECISION_BYTES[kv_precision]
    return per * sum(_keys(shp, i, context) for i in range(shp.n_layers))


def decode_attention_macs_per_key(shp: pm.Shape) -> int:
    """Multiply-adds of one query token against one cached key (scores and values, all heads): MHA / GQA
    ``n_h 2 d_h``; MLA with absorbed up-projections ``n_h (d_c + d_R + d_c)`` (scores over the latent and
    RoPE key, values over the latent; DeepSeek-V2 section 2.1.4)."""
    if shp.attention == "mla":
        return shp.n_heads * (2 * shp.kv_lora_rank + shp.rope_dim)
    return shp.n_heads * 2 * shp.head_dim


# --- routing: distinct experts per step -------------------------------------------------------------


def _shares(load: Sequence[float], num_experts: int) -> list[float]:
    vals = [float(v) for v in load]
    check(len(vals) == num_experts, "load", f"must hold one value per expert ({num_experts})", len(vals))
    check(all(v >= 0 and math.isfinite(v) for v in vals) and sum(vals) > 0, "load",
          "must be finite, >= 0 and not all zero (tokens or shares per expert)", load)
    total = sum(vals)
    return [v / total for v in vals]


def expected_distinct_experts(num_experts: int, top_k: float, batch: float,
                              load: Sequence[float] | None = None) -> float:
    """Expected number of distinct experts that ``batch`` tokens touch in one layer, each token picking
    ``top_k`` distinct experts, tokens independent of one another.

    By linearity of expectation the count is ``sum_e P(e touched) = sum_e 1 - (1 - q_e)^B``, where ``q_e``
    is the chance that one token picks expert ``e`` (the occupancy count, e.g. Feller vol. 1, ch. II).
    Uniform routing: ``q_e = k / E``, hence ``E (1 - (1 - k/E)^B)``. Measured routing: ``load`` gives each
    expert's share ``p_e`` of all assignments (tokens routed to it, from a routing trace); since every
    token makes exactly ``k`` assignments, to distinct experts, ``q_e = k p_e`` holds exactly, whatever the
    joint law of a token's ``k`` picks (without replacement). So the only approximation is that the tokens
    of one step are independent draws (decode batches one token from each of ``B`` different sequences);
    A load no top-k router can produce (``k p_e > 1``, e.g. a steep Zipf law) is capped
    (``inclusion_probabilities``). ``batch`` may be fractional (an average).
    """
    check_int("num_experts", num_experts, 1)
    check(0 < top_k <= num_experts, "top_k", f"must be in (0, num_experts={num_experts}]", top_k)
    check(batch >= 0, "batch", "must be >= 0", batch)
    if load is None:
        return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)
    return sum(1.0 - (1.0 - q) ** batch for q in inclusion_probabilities(_shares(load, num_experts), top_k))


def inclusion_probabilities(shares: Sequence[float], top_k: float) -> list[float]:
    """The chance ``q_e = k p_e`` that one token picks expert ``e``, given each expert's share ``p_e`` of
    the assignments. A token picks an expert at most once, so ``q_e <= 1``: experts asking more are
    capped at 1 and the others rescaled until the ``q_e`` sum to ``k`` again (a measured trace never
    needs it; a fitted Zipf law can)."""
    q = [top_k * p for p in shares]
    capped = [False] * len(q)
    while any(v > 1.0 + 1e-12 for v in q):
        capped = [c or v >= 1.0 for c, v in zip(capped, q, strict=True)]
        free = sum(v for v, c in zip(q, capped, strict=True) if not c)
        scale = (top_k - sum(capped)) / free if free > 0 else 0.0
        q = [1.0 if c else v * scale for v, c in zip(q, capped, strict=True)]
    return q


def zipf_load(num_experts: int, exponent: float) -> list[float]:
    """Expert shares ``p_r ∝ r^-s`` for ranks ``r = 1..E`` (the Zipf law ``zipf_fit`` fits)."""
    check_int("num_experts", num_experts, 1)
    check(exponent >= 0 and math.isfinite(exponent), "exponent", "must be a finite number >= 0", exponent)
    w = [r ** -exponent for r in range(1, num_experts + 1)]
    return [v / sum(w) for v in w]


def zipf_fit(load: Sequence[float]) -> float:
    """Zipf exponent ``s`` of a per-expert load: the least-squares slope of ``log p`` against ``log rank``
    over the experts with a non-zero load, loads sorted from the heaviest (``p_r ∝ r^-s``; 0: uniform).
    Fewer than two loaded experts: ``ValueError``."""
    shares = sorted((p for p in _shares(load, len(load)) if p > 0), reverse=True)
    check(len(shares) >= 2, "load", "needs at least two experts with a non-zero load to fit a slope", len(shares))
    xs = [math.log(r) for r in range(1, len(shares) + 1)]
    ys = [math.log(p) for p in shares]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return -slope


def _routing_load(routing: Any, num_experts: int) -> tuple[Sequence[float] | None, str]:
    if isinstance(routing, str):
        check_choice("routing", routing, ("uniform",))
        return None, "uniform"
    return _shares(routing, num_experts), "measured"


# --- weights on a device ------------------------------------------------------------------------------


def expert_slots_per_device(shp: pm.Shape, ep: int = 1, redundant_experts: int = 0) -> float:
    """Routed-expert slots per device and MoE layer: ``(E + R) / P`` (an average where ``P`` does not
    divide them; EPLB's redundant slots, e.g. DeepSeek's 32: 288 / 144 = 2 per GPU in decode)."""
    check_int("ep", ep, 1)
    check_int("redundant_experts", redundant_experts, 0)
    return (shp.num_experts + redundant_experts) / ep if shp.num_experts else 0.0


def weight_bytes_per_device(shp: pm.Shape, precision: str = "bf16", ep: int = 1, redundant_experts: int = 0) -> float:
    """Bytes of the weights one device holds: everything but the routed experts (attention and the LM
    head are data-parallel), plus its ``(E + R) / P`` expert slots per MoE layer; all in ``precision``.
    With ``ep=1`` and no redundancy this is ``Shape.num_params()`` weights."""
    check_choice("precision", precision, PRECISION_BYTES)
    D = shp.d_model
    attn = sum(k * n for k, n in shp.attention_gemms())
    params = shp.vocab_size * D * (1 if shp.tie_embeddings else 2)
    slots = expert_slots_per_device(shp, ep, redundant_experts)
    for i in range(shp.n_layers):
        params += attn
        if shp.is_moe_layer(i):
            params += shp.router_matmul_params() + 3 * D * (slots * shp.expert_hidden + shp.shared_hidden)
        else:
            params += 3 * D * shp.dense_hidden
    return params * PRECISION_BYTES[precision]


def max_batch(shp: pm.Shape, dev: pm.Device, *, context: float, precision: str = "bf16", ep: int = 1,
              kv_precision: str = "bf16", redundant_experts: int = 0, memory_fraction: float = MEMORY_FRACTION,
              end: str = "value") -> int:
    """Sequences of ``context`` tokens whose KV cache fits in ``memory_fraction`` of ``dev``'s memory
    after its weights: ``floor((f M - W) / kv_cache_bytes(context))``; 0 when the weights alone do not fit."""
    check(0 < memory_fraction <= 1, "memory_fraction", "must be in (0, 1]", memory_fraction)
    check(context >= 1, "context", "must be >= 1 token", context)
    gb = dev.get("hbm_gb", end)
    check(bool(gb), "device", f"{dev.key} has no hbm_gb figure", dev.key)
    free = memory_fraction * gb * 1e9 - weight_bytes_per_device(shp, precision, ep, redundant_experts)
    return max(0, math.floor(free / kv_cache_bytes(shp, context, kv_precision)))


# --- decode ---------------------------------------------------------------------------------------


@dataclass
class DecodePrediction:
    """One predicted decode step of one device (seconds, bytes and FLOPs per step)."""

    shape: str
    device: str
    end: str
    batch: int  # sequences on this device
    context: float  # KV length
    precision: str
    kv_precision: str
    ep: int
    routing: str  # "uniform" or "measured"
    step_s: float
    tpot_s: float  # time per output token of one sequence
    tokens_per_s: float  # output tokens per second of this device
    tokens_per_step: float  # per sequence (1, or more with multi-token prediction)
    parts_s: dict[str, float]  # roofline time of each part; all_to_all: the exposed share
    bytes_read: dict[str, float]  # attention_weights, expert_weights, other_weights, kv_cache
    flops: float
    compute_s: float  # every part's FLOPs at its compute roof
    memory_s: float  # every byte at the memory bandwidth
    bound: str  # "memory" or "compute": the larger of the two above
    a2a_s: float  # all-to-all per step before overlap
    a2a_bytes: float  # off-device bytes per step
    distinct_experts: float  # per MoE layer, over the whole expert-parallel group's batch
    experts_touched: float  # per MoE layer, on this device
    max_batch: int | None  # sequences that fit at this context (None: the table has no memory size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gemm(flops: float, nbytes: float, F: float, B: float) -> float:
    return max(flops / F, nbytes / B)


def predict_decode(shp: pm.Shape, dev: pm.Device, *, batch: int, context: float, precision: str = "bf16",
                   ep: int = 1, routing: Any = "uniform", kv_precision: str = "bf16", redundant_experts: int = 0,
                   overlap: float = 0.0, dispatch_dtype: str = "bf16", combine_dtype: str = "bf16",
                   mtp_tokens: int = 0, mtp_acceptance: float = 0.0, node_size: int | None = None,
                   memory_fraction: float = MEMORY_FRACTION, end: str = "value") -> DecodePrediction:
    """One decode step of ``batch`` sequences per device at KV length ``context`` (see the module
    docstring for what it counts). ``routing``: "uniform", or a per-expert load (tokens or shares, e.g.
    a routing trace's counts or ``zipf_load``). ``node_size``: devices an all-to-all reaches at the
    intra-node bandwidth (default: the device's node; a supernode such as CloudMatrix384 is larger).
    ``overlap`` in [0, 1]: the share of the all-to-all that runs behind compute (the exposed time is
    ``max(compute, overlap x a2a) - compute + (1 - overlap) x a2a``)."""
    check_int("batch", batch, 1)
    check(context >= 1, "context", "must be >= 1 token", context)
    check_choice("end", end, pm.BAND_ENDS)
    check_int("ep", ep, 1)
    check(0.0 <= overlap <= 1.0, "overlap", "must be in [0, 1]", overlap)
    check_int("mtp_tokens", mtp_tokens, 0)
    check(0.0 <= mtp_acceptance <= 1.0, "mtp_acceptance", "must be in [0, 1]", mtp_acceptance)
    for name, dt in (("dispatch_dtype", dispatch_dtype), ("combine_dtype", combine_dtype)):
        check_choice(name, dt, PRECISION_BYTES)
    load, routing_name = _routing_load(routing, shp.num_experts) if shp.num_experts else (None, "dense")
    wb = PRECISION_BYTES[precision]
    F = compute_roof(dev, compute_dtype(precision, dev), end)
    F_attn = compute_roof(dev, compute_dtype("bf16", dev), end)  # core attention runs in bf16 (DeepSeek's serving)
    BW = _bandwidth(dev, end)
    D, H, k = shp.d_model, shp.expert_hidden, shp.top_k
    T = batch * (1 + mtp_tokens)  # query tokens per step on this device: the drafts are verified in the same step
    made = 1.0 + sum(mtp_acceptance ** i for i in range(1, mtp_tokens + 1))  # expected tokens per sequence
    n_moe, n_dense = shp.n_moe_layers, shp.n_layers - shp.n_moe_layers

    flops, nbytes, parts = {}, {}, {}

    def part(name: str, f: float, b: float, roof: float = F) -> None:
        flops[name], nbytes[name], parts[name] = f, b, _gemm(f, b, roof, BW)

    attn = sum(kk * n for kk, n in shp.attention_gemms())
    part("attention_weights", 2.0 * T * attn * shp.n_layers, attn * wb * shp.n_layers)
    # every sequence's cache is read once per step; each query token meets all its keys
    keys = sum(_keys(shp, i, context) for i in range(shp.n_layers))
    part("kv_cache", 2.0 * T * keys * decode_attention_macs_per_key(shp), batch * kv_cache_bytes(shp, context,
                                                                                                 kv_precision),
         roof=F_attn)
    distinct = touched = 0.0
    if n_moe:
        slots = expert_slots_per_device(shp, ep, redundant_experts)
        # the expert-parallel group routes all P devices' tokens; this device holds `slots` of the E experts
        distinct = expected_distinct_experts(shp.num_experts, k, T * ep, load)
        touched = min(slots, distinct * slots / shp.num_experts)
        expert = 3 * D * H
        part("experts", 2.0 * T * k * expert * n_moe, touched * expert * wb * n_moe)
        part("shared", 2.0 * T * 3 * D * shp.shared_hidden * n_moe, 3 * D * shp.shared_hidden * wb * n_moe)
        part("router", 2.0 * T * shp.router_matmul_params() * n_moe, shp.router_matmul_params() * wb * n_moe)
    part("dense_ffn", 2.0 * T * 3 * D * shp.dense_hidden * n_dense, 3 * D * shp.dense_hidden * wb * n_dense)
    part("lm_head", 2.0 * T * shp.vocab_size * D, shp.vocab_size * D * wb)

    # all-to-all: dispatch and combine of T k rows of D per MoE layer, (1 - 1/P) of them leaving the device
    a2a_bytes = a2a_s = 0.0
    if n_moe and ep > 1:
        rows = T * k * D * (1.0 - 1.0 / ep)
        latency = (dev.get("a2a_latency_us", end) or 0.0) * 1e-6
        intra, inter = dev.get("a2a_intra_gb_s", end), dev.get("a2a_inter_gb_s", end)
        per_layer = 0.0
        for dt in (dispatch_dtype, combine_dtype):
            per_layer += latency + pm.all_to_all_time(rows * PRECISION_BYTES[dt], ep, node_size or dev.node_size,
                                                      intra and intra * 1e9, inter and inter * 1e9)
        a2a_bytes = rows * (PRECISION_BYTES[dispatch_dtype] + PRECISION_BYTES[combine_dtype]) * n_moe
        a2a_s = per_layer * n_moe
    compute = sum(parts.values())
    exposed = max(compute, overlap * a2a_s) - compute + (1.0 - overlap) * a2a_s
    parts["all_to_all"] = exposed
    step = compute + exposed
    compute_s = sum(flops[n] / (F_attn if n == "kv_cache" else F) for n in flops)
    memory_s = sum(nbytes.values()) / BW
    other = sum(nbytes.get(n, 0.0) for n in ("shared", "router", "dense_ffn", "lm_head"))
    mb = (max_batch(shp, dev, context=context, precision=precision, ep=ep, kv_precision=kv_precision,
                    redundant_experts=redundant_experts, memory_fraction=memory_fraction, end=end)
          if dev.get("hbm_gb", end) else None)
    return DecodePrediction(
        shape=shp.name, device=dev.key, end=end, batch=batch, context=context, precision=precision,
        kv_precision=kv_precision, ep=ep, routing=routing_name, step_s=step, tpot_s=step / made,
        tokens_per_s=batch * made / step, tokens_per_step=made, parts_s=parts,
        bytes_read={"attention_weights": nbytes["attention_weights"], "expert_weights": nbytes.get("experts", 0.0),
                    "other_weights": other, "kv_cache": nbytes["kv_cache"]},
        flops=sum(flops.values()), compute_s=compute_s, memory_s=memory_s,
        bound="compute" if compute_s > memory_s else "memory", a2a_s=a2a_s, a2a_bytes=a2a_bytes,
        distinct_experts=distinct, experts_touched=touched, max_batch=mb)


# --- prefill --------------------------------------------------------------------------------------


@dataclass
class PrefillPrediction:
    """A predicted prefill of ``batch`` prompts on one device."""

    shape: str
    device: str
    end: str
    prompt_len: int
    batch: int
    tokens: int
    precision: str
    ep: int
    forward_s: float  # the training model's forward roofline
    kv_write_s: float
    time_s: float  # forward + KV write: the batch's time to first token, queueing aside
    tokens_per_s: float  # prompt tokens per second of this device
    parts_s: dict[str, float] = field(default_factory=dict)  # the forward's parts (perfmodel.Prediction)
    a2a_bytes: float = 0.0
    expert_intensity: float = math.nan  # FLOP/byte of the expert GEMMs
    ridge: float = math.nan  # the device's FLOP/byte ridge point

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _predict_dtype(precision: str, dev: pm.Device) -> tuple[str, pm.Device]:
    """(``perfmodel.predict``'s dtype, the device it runs on) for ``precision`` weights: int8 GEMMs run
    on the int8 peak, given to ``predict`` as its 1-byte (fp8) figure; weight-only int4 as bf16."""
    dtype = compute_dtype(precision, dev)
    if dtype != "int8":
        return dtype, dev
    figures = dict(dev.figures)
    figures["fp8_tflops"] = dev.figures["int8_tflops"]
    return "fp8", replace(dev, figures=figures)


def predict_prefill(shp: pm.Shape, dev: pm.Device, *, prompt_len: int, batch: int = 1, precision: str = "bf16",
                    ep: int = 1, kv_precision: str = "bf16", overlap: float = 0.0, comm_dtype: str | None = None,
                    keys: int | None = None, end: str = "value") -> PrefillPrediction:
    """Prefill of ``batch`` prompts of ``prompt_len`` tokens on one device: ``perfmodel.predict``'s forward
    (``backward=False``) over the ``batch x prompt_len`` tokens plus writing their KV cache. ``keys``: keys
    each query's attention core multiplies (default ``ceil((L + 1) / 2)``, a causal kernel's average; a
    kernel that scores a whole preallocated cache meets all its slots). ``comm_dtype``: the all-to-all's
    (default: the GEMMs'). ``overlap``: the share of the all-to-all run behind compute, as in
    ``predict_decode`` (exposed: ``max(compute, overlap x a2a) - compute + (1 - overlap) x a2a``)."""
    check_int("prompt_len", prompt_len, 1)
    check_int("batch", batch, 1)
    check_choice("precision", precision, PRECISION_BYTES)
    span = math.ceil((prompt_len + 1) / 2) if keys is None else keys
    check_int("keys", span, 1)
    dtype, run_on = _predict_dtype(precision, dev)
    tokens = batch * prompt_len
    check(0.0 <= overlap <= 1.0, "overlap", "must be in [0, 1]", overlap)
    # predict counts attention over seq_len keys per query: seq_len = the keys a query meets
    fwd = pm.predict(shp.replace(seq_len=span), run_on, tokens=tokens, ep=ep, dtype=dtype, end=end,
                     comm_dtype=comm_dtype, backward=False)
    parts = dict(fwd.parts_s)
    a2a = parts["all_to_all"]
    compute = fwd.step_s - a2a
    # overlap as in decode: a hidden all-to-all still bounds the step (the training model discounts it)
    parts["all_to_all"] = max(compute, overlap * a2a) - compute + (1.0 - overlap) * a2a
    kv_write = batch * kv_cache_bytes(shp, prompt_len, kv_precision) / _bandwidth(dev, end)
    forward = compute + parts["all_to_all"]
    total = forward + kv_write
    return PrefillPrediction(shape=shp.name, device=dev.key, end=end, prompt_len=prompt_len, batch=batch,
                             tokens=tokens, precision=precision, ep=ep, forward_s=forward, kv_write_s=kv_write,
                             time_s=total, tokens_per_s=tokens / total, parts_s=parts,
                             a2a_bytes=fwd.a2a_bytes, expert_intensity=fwd.expert_intensity, ridge=fwd.ridge)


# --- published serving figures ----------------------------------------------------------------------

_COMMON = ("model", "device", "phase", "value", "per", "source", "setting", "uncertain")
_OPTIONAL = {"devices_per_node": 1, "precision": "bf16", "kv_precision": "bf16", "batch": None, "context": None,
             "tpot_bound_ms": None, "prompt_len": None, "tokens_per_device": None, "cache_hit_rate": 0.0, "ep": 1,
             "redundant_experts": 0, "nodes": None, "scale_up_domain": None, "overlap": 0.0,
             "dispatch_dtype": "bf16", "combine_dtype": "bf16", "mtp_tokens": 0, "mtp_acceptance": 0.0}


@dataclass(kw_only=True, frozen=True)
class PublishedServing:
    """A published serving throughput and the setting it was measured in (``serving_published.yaml``)."""

    key: str
    model: str
    device: str
    phase: str
    value: float
    per: str
    source: str
    setting: str
    uncertain: str
    devices_per_node: int = 1
    precision: str = "bf16"
    kv_precision: str = "bf16"
    batch: int | None = None
    context: float | None = None
    tpot_bound_ms: float | None = None
    prompt_len: int | None = None
    tokens_per_device: int | None = None
    cache_hit_rate: float = 0.0
    ep: int = 1
    redundant_experts: int = 0
    nodes: int | None = None
    scale_up_domain: int | None = None
    overlap: float = 0.0
    dispatch_dtype: str = "bf16"
    combine_dtype: str = "bf16"
    mtp_tokens: int = 0
    mtp_acceptance: float = 0.0

    @property
    def per_device(self) -> float:
        """The published tokens/s per device."""
        return self.value / (self.devices_per_node if self.per == "node" else 1)

    def settings(self) -> str:
        """The setting in one line: precision, batch or prompt, EP, nodes, bound."""
        words = [self.precision]
        if self.phase == "decode":
            words.append(f"B={self.batch}/dev L={self.context:g}")
        else:
            words.append(f"prompt {self.prompt_len}, {self.tokens_per_device} tok/dev")
            if self.cache_hit_rate:
                words.append(f"cache hits {self.cache_hit_rate:.1%}")
        words.append(f"EP{self.ep}" + (f"+{self.redundant_experts}r" if self.redundant_experts else ""))
        if self.nodes:
            words.append(f"{self.nodes} nodes")
        if self.tpot_bound_ms:
            words.append(f"TPOT<{self.tpot_bound_ms:g}ms")
        if self.mtp_tokens:
            words.append(f"MTP {self.mtp_tokens}@{self.mtp_acceptance:g}")
        return ", ".join(words)


def parse_published(table: dict[str, Any]) -> list[PublishedServing]:
    """The entries of ``serving_published.yaml``; ``ValueError`` naming a malformed one."""
    check(isinstance(table, dict) and bool(table), "published", "must be a non-empty mapping of keys", table)
    out = []
    for key, raw in table.items():
        check(isinstance(raw, dict), key, "must be a mapping", raw)
        missing = [f for f in _COMMON if f not in raw]
        check(not missing, key, "lacks " + ", ".join(missing), missing)
        unknown = sorted(set(raw) - set(_COMMON) - set(_OPTIONAL))
        check(not unknown, key, "has unknown fields; known: " + ", ".join((*_COMMON, *_OPTIONAL)), unknown)
        p = PublishedServing(key=key, **{f: raw[f] for f in _COMMON},
                             **{f: raw.get(f, default) for f, default in _OPTIONAL.items()})
        check_choice(f"{key}.phase", p.phase, ("prefill", "decode"))
        check_choice(f"{key}.per", p.per, ("device", "node"))
        check_choice(f"{key}.model", p.model, pm.SHAPES)
        for name in ("precision", "kv_precision", "dispatch_dtype", "combine_dtype"):
            check_choice(f"{key}.{name}", getattr(p, name), PRECISION_BYTES)
        check(bool(str(p.source).strip()), f"{key}.source", "must say where the figure comes from", p.source)
        needs = ("batch", "context") if p.phase == "decode" else ("prompt_len", "tokens_per_device")
        check(all(getattr(p, n) for n in needs), key, f"a {p.phase} figure needs " + " and ".join(needs), raw)
        out.append(p)
    return out


@cache
def _packaged_published() -> tuple[PublishedServing, ...]:
    text = resources.files("workbench.bench").joinpath("serving_published.yaml").read_text()
    return tuple(parse_published(pm._yaml().safe_load(text)))


def load_published(path: str | None = None) -> list[PublishedServing]:
    """The published serving figures: the packaged ``serving_published.yaml``, or an edited copy at ``path``."""
    if path is None:
        return list(_packaged_published())
    with open(path) as fh:
        return parse_published(pm._yaml().safe_load(fh))


def published_prediction(p: PublishedServing, dev: pm.Device, end: str = "value",
                         overlap: float | None = None) -> dict[str, Any]:
    """The model's prediction for one published figure (tokens/s per device) and its relative error;
    ``overlap`` replaces the figure's share of the all-to-all hidden behind compute."""
    if overlap is not None:
        p = replace(p, overlap=overlap)
    shp = pm.shape(p.model)
    row: dict[str, Any] = {"key": p.key, "phase": p.phase, "model": shp.name, "device": p.device, "end": end,
                           "published": p.per_device, "published_as": f"{p.value:,.0f} tok/s per {p.per}",
                           "settings": p.settings(), "source": p.source, "uncertain": p.uncertain}
    if p.phase == "decode":
        d = predict_decode(shp, dev, batch=p.batch, context=p.context, precision=p.precision, ep=p.ep,
                           kv_precision=p.kv_precision, redundant_experts=p.redundant_experts, overlap=p.overlap,
                           dispatch_dtype=p.dispatch_dtype, combine_dtype=p.combine_dtype,
                           mtp_tokens=p.mtp_tokens, mtp_acceptance=p.mtp_acceptance, node_size=p.scale_up_domain,
                           end=end)
        row.update(predicted=d.tokens_per_s, tpot_ms=1e3 * d.tpot_s, tpot_bound_ms=p.tpot_bound_ms, bound=d.bound,
                   max_batch=d.max_batch, a2a_ms=1e3 * d.a2a_s, step_ms=1e3 * d.step_s)
    else:
        batch = max(1, p.tokens_per_device // p.prompt_len)
        f = predict_prefill(shp, dev, prompt_len=p.prompt_len, batch=batch, precision=p.precision, ep=p.ep,
                            kv_precision=p.kv_precision, overlap=p.overlap, end=end,
                            comm_dtype=p.dispatch_dtype if p.dispatch_dtype in pm.DTYPE_BYTES else None)
        # cache hits are served without compute: the published input rate counts them
        row.update(predicted=f.tokens_per_s / (1.0 - p.cache_hit_rate), step_ms=1e3 * f.time_s,
                   bound="compute" if f.expert_intensity >= f.ridge else "memory")
    row["error"] = pm.relative_error(row["predicted"], row["published"])
    return row


def serving_errors(path: str | None = None, devices: dict[str, pm.Device] | None = None,
                   end: str = "value") -> list[dict[str, Any]]:
    """Every published serving figure against the model: predicted and published tokens/s per device and
    the relative error ``(predicted - published) / published`` (+: the model is optimistic), in the
    figure's setting; ``predicted_exposed`` / ``error_exposed``: the same with none of the all-to-all
    hidden behind compute (the published systems overlap it; the truth lies between)."""
    devices = devices or pm.load_devices()
    rows = []
    for p in load_published(path):
        row = published_prediction(p, devices[p.device], end)
        # the overlap a system claims is the model's least certain input: bracket it with none hidden
        exposed = published_prediction(p, devices[p.device], end, overlap=0.0) if p.overlap else row
        row.update(predicted_exposed=exposed["predicted"], error_exposed=exposed["error"])
        rows.append(row)
    return rows


# --- this machine's measured points ---------------------------------------------------------------


def measured_decode_errors(json_path: str, dev: pm.Device | None = None) -> list[dict[str, Any]]:
    """The model against a ``workbench bench generate`` result (``benchmarks/generate-*.json``): its
    prefill and cached-decode tokens/s at each batch size, on this machine.

    ``dev``: the machine's figures; None measures them now (``harness.this_machine``: a matmul and a
    copy, in fp32, with the result's torch thread count). The workbench's KV cache is fp32 and its
    attention scores every slot of the cache (``seq_len``), prompt and decode alike, so the model is run
    with ``precision="fp32"``, ``keys = context = seq_len``; the decode routing is uniform (the result's
    measured distinct experts are printed beside it)."""
    import json

    from workbench.config import preset

    with open(json_path) as fh:
        result = json.load(fh)
    name = result["model"]["preset"]
    check(name != "custom", "json_path", "holds a custom model; the serving model needs a preset's shape", json_path)
    shp = pm.shape_from_model_config(preset(name), name)
    if dev is None:
        dev = _this_machine(result["settings"].get("threads"))
    L = shp.seq_len
    distinct = {d["batch"]: d["mean"] for d in result.get("distinct_experts", [])}
    rows = []
    for r in result["rows"]:
        B, P = r["batch"], r["prompt_len"]
        f = predict_prefill(shp, dev, prompt_len=P, batch=B, precision="fp32", kv_precision="fp32", keys=L)
        d = predict_decode(shp, dev, batch=B, context=L, precision="fp32", kv_precision="fp32")
        common = {"preset": name, "batch": B, "device": dev.name, "threads": result["settings"].get("threads"),
                  "matmul_gflops": 1e3 * dev.get("matmul_tflops"), "bandwidth_gb_s": 1e3 * dev.get("hbm_tb_s"),
                  "file": str(json_path)}
        rows.append({**common, "phase": "prefill", "setting": f"prompt {P}, {B * P} tokens",
                     "measured": r["prefill"]["tokens_per_s"], "predicted": f.tokens_per_s,
                     "error": pm.relative_error(f.tokens_per_s, r["prefill"]["tokens_per_s"])})
        rows.append({**common, "phase": "decode", "setting": f"B={B}, L={L} slots",
                     "measured": r["cached"]["decode_tokens_per_s"], "predicted": d.tokens_per_s,
                     "error": pm.relative_error(d.tokens_per_s, r["cached"]["decode_tokens_per_s"]),
                     "measured_step_ms": r["cached"]["step_ms_median"], "predicted_step_ms": 1e3 * d.step_s,
                     "bound": d.bound, "distinct_uniform": d.distinct_experts, "distinct_measured": distinct.get(B)})
    return rows


def _this_machine(threads: int | None) -> pm.Device:
    import torch

    from workbench.bench.harness import this_machine

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dev, _ = this_machine("cpu", "float32")
    finally:
        torch.set_num_threads(before)
    return dev


# --- tables ---------------------------------------------------------------------------------------


def format_serving_errors(rows: list[dict[str, Any]]) -> str:
    """The published-figures table: predicted vs published tokens/s per device, error, settings."""
    lines = [f"{'figure':<30} {'phase':<7} {'device':<10} {'published':>10} {'predicted':>10} {'error':>7} "
             f"{'exposed':>8} {'TPOT ms':>8}  settings"]
    for r in rows:
        tpot = f"{r['tpot_ms']:.1f}" if "tpot_ms" in r else "-"
        exposed = f"{r['error_exposed']:+.0%}" if "error_exposed" in r else "-"
        lines.append(f"{r['key']:<30} {r['phase']:<7} {r['device']:<10} {r['published']:>10,.0f} "
                     f"{r['predicted']:>10,.0f} {r['error']:>+7.0%} {exposed:>8} {tpot:>8}  {r['settings']}")
    lines.append("tokens/s per device (a per-node figure divided by its devices); error = (predicted - published) / "
                 "published, + = the model is optimistic; exposed: the error with none of the all-to-all hidden")
    return "\n".join(lines)


def format_measured_errors(rows: list[dict[str, Any]]) -> str:
    """This machine's measured prefill and decode tokens/s against the model."""
    lines = [f"{'preset':<7} {'phase':<8} {'batch':>5} {'measured':>10} {'predicted':>10} {'error':>8}  setting"]
    for r in rows:
        extra = ""
        if r["phase"] == "decode":
            extra = (f"; step {r['measured_step_ms']:.2f} ms measured, {r['predicted_step_ms']:.3f} predicted "
                     f"({r['bound']}-bound)")
        lines.append(f"{r['preset']:<7} {r['phase']:<8} {r['batch']:>5} {r['measured']:>10,.0f} "
                     f"{r['predicted']:>10,.0f} {r['error']:>+8.0%}  {r['setting']}{extra}")
    return "\n".join(lines)
