"""An analytic model of MoE training throughput: per-layer roofline plus expert-parallel all-to-all.

What it predicts, per device and per micro-batch of ``T`` tokens (one sequence batch on one device):

- **GEMMs** (attention projections, router, experts, shared expert, dense FFN, LM head), each on the
  roofline: ``t = max(FLOPs / compute, bytes / bandwidth)`` with ``FLOPs = 2 m k n`` and
  ``bytes = b (m k + k n + m n)`` for an ``(m x k) @ (k x n)`` product in a ``b``-byte dtype (Williams,
  Waterman and Patterson, "Roofline", CACM 2009). Training runs three products of equal cost per
  GEMM (forward ``Y = X W``, ``dX = dY W^T``, ``dW = X^T dY``: the same FLOPs, and each reads two of
  the three matrices and writes the third), so a training GEMM costs 3 x its forward roofline time.
- **Expert GEMMs** have ``m`` = the tokens one expert receives: ``T P k / E`` under balanced routing
  on an expert-parallel group of ``P`` ranks (each rank sends ``T k`` assignments spread evenly over
  ``E`` experts and holds ``E / P`` of them). Their arithmetic intensity is about ``m`` FLOP per byte
  for ``m << H, D``, so fine-grained experts (large ``E``, small ``H``, same active FLOPs) fall below a
  device's ridge point (peak / bandwidth) and turn memory-bound.
- **Attention scores and values** (``QK^T`` and ``AV``): compute-bound (fused, flash-style), counted
  over the full ``S x S`` product as ``ModelConfig.flops_per_token`` does (PaLM, appendix B).
- **Element-wise traffic** (norms, residual adds, the SwiGLU activation, permute / un-permute and the
  weighted combine), counted op by op in ``elementwise_elements``; a backward pass moves twice a
  forward's (it reads the saved input and the output gradient and writes the input gradient).
- **All-to-all**: per MoE layer and rank, each of the 4 exchanges of a training step (forward
  dispatch and combine, and their two backward exchanges) sends ``T k D b (1 - 1/P)`` bytes to other
  ranks (hardware.md, "Useful relations"). Traffic that stays in a node (``P`` <= node size) moves at
  the device's effective intra-node all-to-all bandwidth; beyond a node, the share ``(P - n) / (P - 1)``
  of it crosses nodes at the inter-node one, the two running side by side. ``overlap`` in [0, 1] is
  the fraction hidden behind compute (DeepEP-style overlap); 0 by default.

Step time per micro-batch = compute + exposed communication; tokens/s per device = ``T / step``;
MFU = training FLOPs per token x tokens/s / peak (the device's datasheet peak; a second MFU divides
by a matmul measured on that device).

Not modelled, and so part of the error reported against published runs: pipeline bubbles, tensor
parallelism, recomputation, the optimizer step and the data-parallel gradient reduction, load
imbalance between experts, kernel-launch and framework overheads, multi-token prediction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

from workbench.validation import check, check_choice, check_int

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FIGURES = ("bf16_tflops", "fp32_tflops", "fp8_tflops", "matmul_tflops", "hbm_tb_s", "hbm_gb", "link_gb_s",
           "a2a_intra_gb_s", "inter_node_gb_s", "a2a_inter_gb_s",
           # read by the serving model and the offloading simulators only: int8 GEMMs, the fixed cost of one
           # all-to-all exchange, the host link (CPU memory <-> device, one direction)
           "int8_tflops", "a2a_latency_us", "host_link_gb_s")
BAND_ENDS = ("low", "value", "high")


# --- device table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One figure of the device table: the value the model uses, its band and where it comes from."""

    value: float | None
    low: float | None = None
    high: float | None = None
    source: str = ""
    status: str = "datasheet"
    alternatives: tuple[str, ...] = ()

    def at(self, end: str = "value") -> float | None:
        """``value``, or the ``low`` / ``high`` end of the band (the value where there is no band)."""
        check_choice("end", end, BAND_ENDS)
        got = getattr(self, end)
        return self.value if got is None else got


@dataclass(frozen=True)
class Device:
    """A device's figures (``Figure`` each, see ``devices.yaml`` for units) and its node size."""

    key: str
    name: str
    node_size: int
    figures: dict[str, Figure] = field(default_factory=dict)
    matmul_dtype: str = "bf16"  # the dtype the matmul_tflops figure was measured in

    def get(self, figure: str, end: str = "value") -> float | None:
        check_choice("figure", figure, FIGURES)
        f = self.figures.get(figure)
        return None if f is None else f.at(end)

    def contested(self) -> list[str]:
        """Names of the figures labelled ``contested`` in the table."""
        return [k for k, f in self.figures.items() if f.status == "contested"]


def _figure(key: str, name: str, raw: Any) -> Figure:
    check(isinstance(raw, dict) and "value" in raw, f"{key}.{name}", "must be a mapping with at least 'value' "
          "(and optionally low, high, source, status, alternatives)", raw)
    f = Figure(value=raw["value"], low=raw.get("low"), high=raw.get("high"), source=raw.get("source", ""),
               status=raw.get("status", "datasheet"), alternatives=tuple(raw.get("alternatives", ())))
    for end in BAND_ENDS:
        v = getattr(f, end)
        check(v is None or (isinstance(v, (int, float)) and v > 0), f"{key}.{name}.{end}", "must be a number > 0 or "
              "null", v)
    if f.low is not None and f.high is not None:
        check(f.low <= (f.value or f.low) <= f.high, f"{key}.{name}", "needs low <= value <= high", (f.low, f.value,
                                                                                                      f.high))
    return f


def parse_devices(table: dict[str, Any]) -> dict[str, Device]:
    """Devices from the mapping ``devices.yaml`` holds; ``ValueError`` naming a malformed entry."""
    check(isinstance(table, dict) and bool(table), "devices", "must be a non-empty mapping of device keys", table)
    out = {}
    for key, raw in table.items():
        check(isinstance(raw, dict) and "name" in raw, key, "must be a mapping with a 'name'", raw)
        unknown = sorted(set(raw) - {"name", "node_size", *FIGURES})
        check(not unknown, key, "has unknown figures; known: name, node_size, " + ", ".join(FIGURES), unknown)
        figures = {name: _figure(key, name, raw[name]) for name in FIGURES if name in raw}
        node = raw.get("node_size", 8)
        check_int(f"{key}.node_size", node, 1)
        out[key] = Device(key=key, name=raw["name"], node_size=node, figures=figures)
    return out


@cache
def _packaged_devices() -> dict[str, Device]:
    text = resources.files("workbench.bench").joinpath("devices.yaml").read_text()
    return parse_devices(_yaml().safe_load(text))


def load_devices(path: str | None = None) -> dict[str, Device]:
    """The device table: the packaged ``workbench/bench/devices.yaml``, or an edited copy at ``path``."""
    if path is None:
        return dict(_packaged_devices())
    with open(path) as fh:
        return parse_devices(_yaml().safe_load(fh))


def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml comes with the dev and experiments extras
        raise ImportError("the device table needs pyyaml: pip install pyyaml (or 'moe-workbench[experiments]')") \
            from err
    return yaml


def device(key: str, path: str | None = None) -> Device:
    devices = load_devices(path)
    check_choice("device", key, devices)
    return devices[key]


def measured_device(matmul_flops: float, bandwidth_bytes_s: float, name: str = "this machine",
                    dtype: str = "fp32") -> Device:
    """"This machine" as a ``Device``: a matmul peak and a memory bandwidth measured at run time.

    The measured matmul is both the peak and the compute roof (there is no datasheet for it); the
    figure named after ``dtype`` carries it, so ``predict`` finds it under that dtype.
    """
    check(matmul_flops > 0, "matmul_flops", "must be > 0 (FLOP/s)", matmul_flops)
    check(bandwidth_bytes_s > 0, "bandwidth_bytes_s", "must be > 0 (bytes/s)", bandwidth_bytes_s)
    check_choice("dtype", dtype, DTYPE_BYTES)
    peak = Figure(value=matmul_flops / 1e12, source="measured in this run", status="measured")
    peak_name = {"fp32": "fp32_tflops", "fp8": "fp8_tflops"}.get(dtype, "bf16_tflops")
    figures = {peak_name: peak, "matmul_tflops": peak,
               "hbm_tb_s": Figure(value=bandwidth_bytes_s / 1e12, source="measured in this run", status="measured")}
    return Device(key="this_machine", name=name, node_size=1, figures=figures, matmul_dtype=dtype)


# --- model shapes -------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class Shape:
    """The shape of a decoder-only MoE transformer, enough to count its FLOPs, bytes and traffic.

    ``attention``: "gqa" (``n_heads`` query heads of ``head_dim``, ``n_kv_heads`` key/value heads) or
    "mla" (DeepSeek-V2/V3 multi-head latent attention: ``q_lora_rank`` (0: no query compression),
    ``kv_lora_rank``, ``head_dim`` = the no-RoPE query/key part, ``rope_dim``, ``v_head_dim``).
    ``sliding_window`` with ``sliding_every`` = 2: every other layer attends over ``sliding_window``
    keys (GPT-OSS). ``top_k`` may be fractional (expert choice's average experts per token).
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int
    n_kv_heads: int | None = None  # None: = n_heads
    num_experts: int = 0  # 0: a dense model
    top_k: float = 0
    expert_hidden: int = 0
    shared_hidden: int = 0
    router_params: int | None = None  # matmul parameters of one router; None: d_model * num_experts
    dense_hidden: int = 0  # FFN width of the dense layers
    first_dense_layers: int = 0
    moe_every: int = 1
    tie_embeddings: bool = False
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int | None = None
    sliding_every: int = 2
    source: str = ""
    uncertain: str = ""  # what in this shape is not from a published config

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "head_dim", "vocab_size", "seq_len"):
            check_int(name, getattr(self, name), 1)
        check_choice("attention", self.attention, ("gqa", "mla"))
        check(self.num_experts == 0 or 0 < self.top_k <= self.num_experts, "top_k",
              f"must be in (0, num_experts={self.num_experts}]", self.top_k)
        check(self.num_experts == 0 or self.expert_hidden >= 1, "expert_hidden", "must be >= 1 for an MoE",
              self.expert_hidden)

    # --- layer layout ---
    def is_moe_layer(self, i: int) -> bool:
        if self.num_experts == 0 or i < self.first_dense_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def attention_span(self, i: int) -> int:
        """Keys each query of layer ``i`` meets (full causal products counted unmasked, as PaLM does)."""
        if self.sliding_window is not None and i % self.sliding_every == 0:
            return min(self.sliding_window, self.seq_len)
        return self.seq_len

    # --- GEMMs: (k, n) of each weight a token goes through, per layer -----------------------------
    def attention_gemms(self) -> list[tuple[int, int]]:
        """(in, out) of the attention projections; per token."""
        D, nh, hd = self.d_model, self.n_heads, self.head_dim
        if self.attention == "gqa":
            kv = self.n_kv_heads or nh
            return [(D, nh * hd), (D, 2 * kv * hd), (nh * hd, D)]
        qk = hd + self.rope_dim
        q = [(D, self.q_lora_rank), (self.q_lora_rank, nh * qk)] if self.q_lora_rank else [(D, nh * qk)]
        v = self.v_head_dim or hd
        return q + [(D, self.kv_lora_rank + self.rope_dim), (self.kv_lora_rank, nh * (hd + v)), (nh * v, D)]

    def attention_core_macs(self, i: int) -> int:
        """Multiply-adds per token of ``QK^T`` and ``AV`` in layer ``i`` (forward)."""
        qk = self.head_dim + (self.rope_dim if self.attention == "mla" else 0)
        v = (self.v_head_dim or self.head_dim) if self.attention == "mla" else self.head_dim
        return self.attention_span(i) * self.n_heads * (qk + v)

    def router_matmul_params(self) -> int:
        return self.d_model * self.num_experts if self.router_params is None else self.router_params

    # --- parameters and FLOPs ---
    def active_matmul_params(self) -> float:
        """Weights a token's compute multiplies by (LM head included, embedding lookups excluded)."""
        D = self.d_model
        total: float = self.vocab_size * D
        attn = sum(k * n for k, n in self.attention_gemms())
        for i in range(self.n_layers):
            total += attn
            if self.is_moe_layer(i):
                total += self.router_matmul_params() + 3 * D * (self.top_k * self.expert_hidden + self.shared_hidden)
            else:
                total += 3 * D * self.dense_hidden
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x active matmul parameters + 6 x the attention core's
        multiply-adds (forward + backward = 3 x forward, 2 FLOPs per multiply-add; Kaplan et al.
        2020, PaLM appendix B), the convention of ``ModelConfig.flops_per_token``."""
        core = sum(self.attention_core_macs(i) for i in range(self.n_layers))
        return 6.0 * (self.active_matmul_params() + core)

    def num_params(self) -> float:
        """All parameters, norms excluded (embeddings included; for sizing, not for FLOPs)."""
        D = self.d_model
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        attn = sum(k * n for k, n in self.attention_gemms())
        total = embed
        for i in range(self.n_layers):
            total += attn
            if self.is_moe_layer(i):
                total += self.router_matmul_params() + 3 * D * (self.num_experts * self.expert_hidden
                                                                + self.shared_hidden)
            else:
                total += 3 * D * self.dense_hidden
        return total

    def elementwise_elements(self, i: int) -> float:
        """Elements read + written per token by layer ``i``'s element-wise ops (forward).

        Two RMSNorms (read D, write D each), two residual adds (read 2D, write D each); MoE layers:
        the SwiGLU activation over each of ``k`` expert rows and the shared expert (read 2H, write H),
        permute and un-permute (read D, write D per assignment each) and the weighted combine (read
        k D, write D); dense layers: the SwiGLU activation over ``dense_hidden``.
        """
        D = self.d_model
        n = 2 * 2 * D + 2 * 3 * D
        if self.is_moe_layer(i):
            k = self.top_k
            n += 3 * (k * self.expert_hidden + self.shared_hidden) + 2 * 2 * k * D + (k * D + D)
        else:
            n += 3 * self.dense_hidden
        return n

    def replace(self, **changes: Any) -> Shape:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_from_model_config(cfg, name: str = "workbench") -> Shape:
    """The ``Shape`` of a workbench ``ModelConfig``; its ``flops_per_token`` equals the config's.

    Refuses a router that mixes tokens (soft MoE): its FLOPs do not follow from a per-token count.
    """
    from workbench.moe.routers import router_class

    moe = cfg.moe
    fields: dict[str, Any] = dict(name=name, n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                  head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                                  dense_hidden=cfg.dense_hidden, first_dense_layers=cfg.first_dense_layers,
                                  moe_every=cfg.moe_every, tie_embeddings=cfg.tie_embeddings,
                                  source="workbench.config preset")
    if moe is not None:
        rc = router_class(moe.router)
        check(rc.token_mixing_macs(moe, cfg.d_model) == 0, "router",
              "mixes tokens (soft MoE); the throughput model counts per-token work only", moe.router)
        fields.update(num_experts=moe.num_experts, top_k=cfg.experts_per_token(), expert_hidden=moe.expert_hidden,
                      shared_hidden=moe.shared_hidden, router_params=rc.num_matmul_params(cfg.d_model, moe))
    return Shape(**fields)


def granular(shape: Shape, factor: int) -> Shape:
    """Fine-grained experts at the same active FLOPs (DeepSeekMoE's expert segmentation): ``factor``
    x the experts and the top-k, ``1 / factor`` of the expert hidden size."""
    check_int("factor", factor, 1)
    check(shape.expert_hidden % factor == 0, "factor", f"must divide expert_hidden={shape.expert_hidden}", factor)
    return shape.replace(name=f"{shape.name} x{factor} granularity", num_experts=shape.num_experts * factor,
                         top_k=shape.top_k * factor, expert_hidden=shape.expert_hidden // factor)


# Real models. Fields marked in ``uncertain`` are not in a published config and are assumptions.
SHAPES: dict[str, Shape] = {
    "mixtral-8x7b": Shape(
        name="Mixtral 8x7B", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000,
        seq_len=4096, num_experts=8, top_k=2, expert_hidden=14336,
        source="mistralai/Mixtral-8x7B-v0.1 config.json (hidden 4096, 32 layers, 32 heads, 8 KV heads, "
               "intermediate 14336, 8 experts, top-2, vocab 32000)",
        uncertain="seq_len 4096 is the benchmark's assumed training length, not a model property"),
    "deepseek-v3": Shape(
        name="DeepSeek-V3", n_layers=61, d_model=7168, n_heads=128, head_dim=128, vocab_size=129280, seq_len=4096,
        num_experts=256, top_k=8, expert_hidden=2048, shared_hidden=2048, dense_hidden=18432, first_dense_layers=3,
        attention="mla", q_lora_rank=1536, kv_lora_rank=512, rope_dim=64, v_head_dim=128,
        source="deepseek-ai/DeepSeek-V3 config.json (61 layers, hidden 7168, 128 heads, q_lora 1536, kv_lora 512, "
               "qk_nope 128, qk_rope 64, v 128, 256 routed + 1 shared of 2048, top-8, first 3 layers dense of 18432, "
               "vocab 129280); pre-training length 4K (DeepSeek-V3 report)",
        uncertain="the multi-token-prediction module is not counted"),
    "qwen3-30b-a3b": Shape(
        name="Qwen3-30B-A3B", n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128, vocab_size=151936,
        seq_len=4096, num_experts=128, top_k=8, expert_hidden=768,
        source="Qwen/Qwen3-30B-A3B config (48 layers, hidden 2048, 32 heads, 4 KV heads, head_dim 128, 128 experts "
               "of 768, top-8, vocab 151936), as in slime scripts/models/qwen3-30B-A3B.sh",
        uncertain="seq_len 4096: the NeMo benchmark's"),
    "qwen3-235b-a22b": Shape(
        name="Qwen3-235B-A22B", n_layers=94, d_model=4096, n_heads=64, n_kv_heads=4, head_dim=128, vocab_size=151936,
        seq_len=4096, num_experts=128, top_k=8, expert_hidden=1536,
        source="Qwen/Qwen3-235B-A22B config (94 layers, hidden 4096, 64 heads, 4 KV heads, head_dim 128, 128 experts "
               "of 1536, top-8, vocab 151936), as in slime scripts/models/qwen3-235B-A22B.sh",
        uncertain="seq_len 4096: the Megatron-MoE-ModelZoo benchmark's"),
    "telechat3-105b-a4.7b": Shape(
        name="TeleChat3-105B-A4.7B", n_layers=45, d_model=2560, n_heads=32, head_dim=128, vocab_size=131072,
        seq_len=4096, num_experts=192, top_k=4, expert_hidden=1536, shared_hidden=1536, dense_hidden=7680,
        first_dense_layers=1, attention="mla", q_lora_rank=1536, kv_lora_rank=512, rope_dim=64, v_head_dim=128,
        source="Tele-AI/TeleChat3 README: 45 layers, hidden 2560, FFN intermediate 7680, MLA, 192 routed experts, "
               "top-4, 1 shared",
        uncertain="NOT published, assumed: expert hidden 1536 (with it the total and active counts come to about "
                  "the name's 105B and 4.7B), FFN 7680 read as the dense layers' width, 1 dense first layer, "
                  "32 heads, DeepSeek-V3's MLA ranks, "
                  "vocab 131072, seq_len 4096"),
    "gpt-oss-120b": Shape(
        name="GPT-OSS-120B", n_layers=36, d_model=2880, n_heads=64, n_kv_heads=8, head_dim=64, vocab_size=201088,
        seq_len=4096, num_experts=128, top_k=4, expert_hidden=2880, sliding_window=128, sliding_every=2,
        source="openai/gpt-oss-120b config (36 layers, hidden 2880, 64 heads of 64, 8 KV heads, 128 experts of 2880, "
               "top-4, vocab 201088, alternate layers with a 128-token window)",
        uncertain="attention sinks and biases are not counted; seq_len 4096: the NeMo benchmark's"),
    "pangu-ultra-moe-718b": Shape(
        name="Pangu Ultra MoE 718B", n_layers=61, d_model=7680, n_heads=128, head_dim=128, vocab_size=153600,
        seq_len=4096, num_experts=256, top_k=8, expert_hidden=2048, shared_hidden=2048, dense_hidden=18432,
        first_dense_layers=3, attention="mla", q_lora_rank=1536, kv_lora_rank=512, rope_dim=64, v_head_dim=128,
        source="openPangu-Ultra-MoE-718B configuration (vocab 153600, hidden 7680, intermediate 18432, moe 2048, 61 "
               "layers, 128 heads, 1 shared + 256 routed); arXiv 2505.04519",
        uncertain="assumed as DeepSeek-V3 (which the released config otherwise follows): top-8, 3 dense layers, MLA "
                  "ranks; seq_len 4096 is assumed"),
}


def shape(name: str) -> Shape:
    check_choice("shape", name, SHAPES)
    return SHAPES[name]


# --- roofline -----------------------------------------------------------------------------------


def gemm_time(m: float, k: float, n: float, *, flops_per_s: float, bytes_per_s: float, dtype_bytes: int) -> float:
    """Forward roofline time (s) of an ``(m x k) @ (k x n)`` product: max(2 m k n / compute,
    b (m k + k n + m n) / bandwidth)."""
    flops = 2.0 * m * k * n
    moved = dtype_bytes * (m * k + k * n + m * n)
    return max(flops / flops_per_s, moved / bytes_per_s)


def arithmetic_intensity(m: float, k: float, n: float, dtype_bytes: int) -> float:
    """FLOPs per byte of the product: 2 m k n / (b (m k + k n + m n))."""
    return 2.0 * m * k * n / (dtype_bytes * (m * k + k * n + m * n))


def all_to_all_bytes(tokens: float, top_k: float, d_model: int, ep: int, dtype_bytes: int,
                     exchanges: int = 4) -> float:
    """Bytes one rank sends to other ranks per MoE layer: ``exchanges x T k D b (1 - 1/P)``.

    Four exchanges per training step: forward dispatch and combine, and their backward twins.
    """
    check_int("ep", ep, 1)
    return exchanges * tokens * top_k * d_model * dtype_bytes * (1.0 - 1.0 / ep)


def all_to_all_time(nbytes: float, ep: int, node_size: int, intra_bytes_s: float | None,
                    inter_bytes_s: float | None) -> float:
    """Seconds to move ``nbytes`` off-rank bytes: the intra-node share at the intra-node bandwidth
    and the inter-node share ``(P - n) / (P - 1)`` at the inter-node one, the two in parallel."""
    if ep <= 1 or nbytes == 0:
        return 0.0
    inter_share = max(0, ep - node_size) / (ep - 1)
    check(intra_bytes_s is not None or inter_share == 1, "a2a_intra_gb_s", "is missing for this device", None)
    check(inter_bytes_s is not None or inter_share == 0, "a2a_inter_gb_s", "is missing for this device (needed "
          f"for an expert-parallel degree {ep} > node size {node_size})", None)
    intra = nbytes * (1 - inter_share) / intra_bytes_s if inter_share < 1 else 0.0
    inter = nbytes * inter_share / inter_bytes_s if inter_share > 0 else 0.0
    return max(intra, inter)


@dataclass
class Prediction:
    """A predicted training step of one device (seconds per micro-batch, split by part)."""

    shape: str
    device: str
    end: str
    tokens: int
    ep: int
    dtype: str
    parts_s: dict[str, float]
    a2a_bytes: float
    step_s: float
    tokens_per_s: float
    tflops: float  # model FLOPs per second per device, in TFLOP/s
    mfu: float | None  # against the dtype's datasheet peak (the low end: its highest; the high end: its lowest)
    mfu_matmul: float | None  # against the device's measured matmul
    expert_rows: float  # tokens per expert (the expert GEMMs' m)
    expert_intensity: float  # FLOP/byte of the expert GEMMs
    ridge: float  # FLOP/byte where the device turns compute-bound

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peak_figure(dtype: str) -> str:
    return {"fp32": "fp32_tflops", "fp8": "fp8_tflops"}.get(dtype, "bf16_tflops")


def predict(shp: Shape, dev: Device, *, tokens: int | None = None, ep: int = 1, dtype: str = "bf16",
            end: str = "value", overlap: float = 0.0, comm_dtype: str | None = None,
            a2a_intra_gb_s: float | None = None, a2a_inter_gb_s: float | None = None,
            backward: bool = True) -> Prediction:
    """Predicted training step of one device: ``tokens`` per micro-batch (default one sequence),
    experts over ``ep`` ranks, GEMMs in ``dtype``, device figures at ``end`` of their bands
    ("low", "value", "high"); ``a2a_*_gb_s`` override the table's all-to-all bandwidths.
    ``backward=False``: a forward pass only (1 product per GEMM, 2 all-to-all exchanges); its
    ``tflops`` and MFU still count forward FLOPs only (a third of the training count)."""
    check_choice("dtype", dtype, DTYPE_BYTES)
    check_choice("end", end, BAND_ENDS)
    check_int("ep", ep, 1)
    check(shp.num_experts == 0 or shp.num_experts % ep == 0, "ep", f"must divide num_experts={shp.num_experts}", ep)
    check(0.0 <= overlap <= 1.0, "overlap", "must be in [0, 1]", overlap)
    T = shp.seq_len if tokens is None else tokens
    check_int("tokens", T, 1)
    b = DTYPE_BYTES[dtype]
    cb = DTYPE_BYTES[comm_dtype or dtype]
    peak_tf = dev.get(_peak_figure(dtype), end)
    # MFU's ends pair the throughput of one end with the peak of the other: the low end's few tokens
    # against the highest peak. Same-end pairs left the table value outside its own printed band
    # (Ascend 910B2: 73.1% (77-80%), the peak band being wider than the throughput's)
    mfu_peak_tf = dev.get(_peak_figure(dtype), {"low": "high", "high": "low"}.get(end, end))
    same_dtype = DTYPE_BYTES[dtype] == DTYPE_BYTES[dev.matmul_dtype]
    roof_tf = dev.get("matmul_tflops", end) if same_dtype else None
    if roof_tf is None:
        # no matmul measured in this dtype: the datasheet peak at the efficiency of the measured one
        mm, mm_peak = dev.get("matmul_tflops", end), dev.get(_peak_figure(dev.matmul_dtype), end)
        eff = mm / mm_peak if (mm and mm_peak) else 1.0
        roof_tf = (peak_tf or 0) * eff
    check(bool(roof_tf), "device", f"{dev.key} has no {_peak_figure(dtype)} or matmul_tflops figure for dtype={dtype}",
          dev.key)
    bw_tb = dev.get("hbm_tb_s", end)
    check(bool(bw_tb), "device", f"{dev.key} has no hbm_tb_s figure", dev.key)
    F, B = roof_tf * 1e12, bw_tb * 1e12

    passes = 3 if backward else 1  # a training GEMM: 3 products of equal roofline cost

    def g(m, k, n):
        return passes * gemm_time(m, k, n, flops_per_s=F, bytes_per_s=B, dtype_bytes=b)

    D = shp.d_model
    parts = dict.fromkeys(("attention_proj", "attention_core", "router", "experts", "shared", "dense_ffn", "lm_head",
                           "elementwise", "all_to_all"), 0.0)
    attn = sum(g(T, k, n) for k, n in shp.attention_gemms())
    rows = T * ep * shp.top_k / shp.num_experts if shp.num_experts else 0.0
    H = shp.expert_hidden
    local_experts = shp.num_experts // ep if shp.num_experts else 0
    expert_t = local_experts * (2 * g(rows, D, H) + g(rows, H, D)) if rows else 0.0
    a2a_bytes = all_to_all_bytes(T, shp.top_k, D, ep, cb, exchanges=4 if backward else 2) if shp.num_experts else 0.0
    intra = (a2a_intra_gb_s if a2a_intra_gb_s is not None else dev.get("a2a_intra_gb_s", end))
    inter = (a2a_inter_gb_s if a2a_inter_gb_s is not None else dev.get("a2a_inter_gb_s", end))
    a2a_t = all_to_all_time(a2a_bytes, ep, dev.node_size, intra and intra * 1e9, inter and inter * 1e9)
    for i in range(shp.n_layers):
        parts["attention_proj"] += attn
        parts["attention_core"] += passes * 2.0 * T * shp.attention_core_macs(i) / F
        parts["elementwise"] += passes * b * T * shp.elementwise_elements(i) / B
        if shp.is_moe_layer(i):
            parts["router"] += g(T, D, shp.num_experts)
            parts["experts"] += expert_t
            if shp.shared_hidden:
                parts["shared"] += 2 * g(T, D, shp.shared_hidden) + g(T, shp.shared_hidden, D)
            parts["all_to_all"] += a2a_t * (1.0 - overlap)
        else:
            parts["dense_ffn"] += 2 * g(T, D, shp.dense_hidden) + g(T, shp.dense_hidden, D)
    parts["lm_head"] = g(T, D, shp.vocab_size)
    step = sum(parts.values())
    tps = T / step
    achieved = shp.flops_per_token() * tps * passes / 3
    return Prediction(
        shape=shp.name, device=dev.key, end=end, tokens=T, ep=ep, dtype=dtype, parts_s=parts,
        a2a_bytes=a2a_bytes * shp.n_moe_layers, step_s=step, tokens_per_s=tps, tflops=achieved / 1e12,
        mfu=achieved / (mfu_peak_tf * 1e12) if mfu_peak_tf else None,
        mfu_matmul=achieved / (roof_tf * 1e12),
        expert_rows=rows, expert_intensity=arithmetic_intensity(rows, D, H, b) if rows else math.nan,
        ridge=F / B)


def moe_layer_flops(tokens: int, d_model: int, num_experts: int, top_k: float, expert_hidden: int,
                    backward: bool = True) -> float:
    """Matmul FLOPs of one MoE layer (router + the routed experts' SwiGLU GEMMs) on ``tokens``:
    ``2 T D E + 2 T k 3 D H`` forward, 3x that with the backward."""
    forward = 2.0 * tokens * d_model * num_experts + 2.0 * tokens * top_k * 3 * d_model * expert_hidden
    return forward * (3 if backward else 1)


def predict_moe_layer(tokens: int, d_model: int, num_experts: int, top_k: float, expert_hidden: int, dev: Device, *,
                      dtype: str = "fp32", backward: bool = True, end: str = "value") -> float:
    """Predicted seconds of one MoE layer (router, experts, the MoE's element-wise traffic), as
    ``predict`` counts them for a layer of a model, on one device without expert parallelism."""
    shp = Shape(name="layer", n_layers=1, d_model=d_model, n_heads=1, head_dim=d_model, vocab_size=1, seq_len=1,
                num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden)
    parts = predict(shp, dev, tokens=tokens, dtype=dtype, backward=backward, end=end).parts_s
    # the layer alone: no attention, LM head, norms or residual adds (2 norms + 2 adds = 10 D elements)
    passes = 3 if backward else 1
    norms_adds = passes * DTYPE_BYTES[dtype] * tokens * 10 * d_model / (dev.get("hbm_tb_s", end) * 1e12)
    return parts["router"] + parts["experts"] + parts["elementwise"] - norms_adds


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOP utilisation: ``flops_per_token x tokens_per_s / peak_flops`` (PaLM, appendix B)."""
    check(peak_flops > 0, "peak_flops", "must be > 0", peak_flops)
    return flops_per_token * tokens_per_s / peak_flops


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: + means the model is optimistic (too fast)."""
    check(measured != 0, "measured", "must be non-zero", measured)
    return (predicted - measured) / measured


# --- published figures --------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class Published:
    """A published training-throughput figure and the setting it was measured in.

    ``metric``: "tflops_per_device", "tokens_per_s_per_device", "mfu" or "samples_per_s_per_device";
    ``tokens``: tokens per device per micro-batch (micro-batch x sequence length).
    """

    key: str
    shape: str
    device: str
    metric: str
    value: float
    tokens: int
    ep: int
    dtype: str = "bf16"
    devices_used: int = 0
    source: str = ""
    setting: str = ""
    uncertain: str = ""


PUBLISHED: tuple[Published, ...] = (
    Published(key="megatron-mixtral-h100", shape="mixtral-8x7b", device="H100", metric="tflops_per_device",
              value=468, tokens=4096, ep=8, devices_used=64,
              source="NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md: 468 TFLOPS for Mixtral 8X7B bf16 "
                     "training with MCore v0.9; 64 x H100 per the project's hardware.md",
              setting="bf16, 64 x H100",
              uncertain="the README gives no sequence length, micro-batch or parallel layout: 4096 tokens and EP=8 "
                        "assumed; Megatron counts FLOPs with its own formula"),
    Published(key="deepseek-v3-h800", shape="deepseek-v3", device="H800", metric="tokens_per_s_per_device",
              value=1e12 / (180e3 * 3600), tokens=4096, ep=64, dtype="fp8", devices_used=2048,
              source="DeepSeek-V3 report (arXiv 2412.19437): 180K H800 GPU-hours per trillion tokens, 2,048 H800 "
                     "(1e12 / (180e3 x 3600) = 1,543 tokens/s per GPU)",
              setting="FP8 GEMMs, 64-way EP over 8 nodes, DualPipe overlap of computation and all-to-all",
              uncertain="FP8 (the model uses the fp8 peak at the bf16 matmul efficiency); MTP not counted"),
    Published(key="nemo-deepseek-v3-h100", shape="deepseek-v3", device="H100", metric="tokens_per_s_per_device",
              value=1002, tokens=4096, ep=64, devices_used=256,
              source="NVIDIA-NeMo/Automodel docs/performance-summary.md: DeepSeek V3 671B, 256 x H100, BF16, seq "
                     "4096, MBS 1, EP 64, PP 4: 1,002 tokens/s/GPU (250 model TFLOP/s/GPU)",
              setting="bf16, TE + DeepEP"),
    Published(key="nemo-qwen3-30b-h100", shape="qwen3-30b-a3b", device="H100", metric="tokens_per_s_per_device",
              value=12040, tokens=4 * 4096, ep=8, devices_used=8,
              source="NVIDIA-NeMo/Automodel docs/performance-summary.md: Qwen3 MoE 30B, 8 x H100, BF16, seq 4096, MBS "
                     "4, EP 8: 12,040 tokens/s/GPU (277 TFLOP/s/GPU)",
              setting="bf16, TE + DeepEP"),
    Published(key="nemo-gpt-oss-120b-h100", shape="gpt-oss-120b", device="H100", metric="tokens_per_s_per_device",
              value=7626, tokens=2 * 4096, ep=1, devices_used=64,
              source="NVIDIA-NeMo/Automodel docs/performance-summary.md: GPT-OSS 120B, 64 x H100, BF16, seq 4096, MBS "
                     "2, no EP (FSDP 64): 7,626 tokens/s/GPU (231 TFLOP/s/GPU)",
              setting="bf16, TE + DeepEP + FlexAttn"),
    Published(key="pangu-ultra-moe-ascend", shape="pangu-ultra-moe-718b", device="Ascend910B", metric="mfu",
              value=0.30, tokens=4096, ep=32, devices_used=6000,
              source="Pangu Ultra MoE (arXiv 2505.04519) abstract: MFU 30.0% on 6K Ascend NPUs (1.46M tokens/s)",
              setting="bf16 on Ascend NPUs (Atlas 800T A2 class)",
              uncertain="the MFU's peak is not stated; EP degree and sequence length assumed (EP 32, 4096)"),
    Published(key="telechat3-ascend", shape="telechat3-105b-a4.7b", device="Ascend910B",
              metric="samples_per_s_per_device", value=0.1002, tokens=4096, ep=8, devices_used=4096,
              source="Tele-AI/TeleChat3 README: 105B-A4.7B, 0.1002 samples per NPU per second on 4,096 NPUs "
                     "(Atlas 800T A2)",
              setting="MindSpore + MindSpore Transformers",
              uncertain="sequence length per sample is not stated (4096 assumed); expert hidden and MLA ranks "
                        "assumed (see the shape); EP 8 assumed"),
)


def published_point(p: Published, devices: dict[str, Device] | None = None, end: str = "value",
                    **overrides: Any) -> dict[str, Any]:
    """The model's prediction for a published figure, in that figure's metric, and the error."""
    devices = devices or load_devices()
    shp = shape(p.shape)
    pred = predict(shp, devices[p.device], tokens=p.tokens, ep=p.ep, dtype=p.dtype, end=end, **overrides)
    if p.metric == "tflops_per_device":
        got = pred.tflops
    elif p.metric == "tokens_per_s_per_device":
        got = pred.tokens_per_s
    elif p.metric == "mfu":
        got = pred.mfu
    elif p.metric == "samples_per_s_per_device":
        got = pred.tokens_per_s / shp.seq_len
    else:  # pragma: no cover - the table above names only these
        raise ValueError(f"metric={p.metric!r} is invalid")
    return {"key": p.key, "model": shp.name, "device": p.device, "metric": p.metric, "published": p.value,
            "predicted": got, "error": relative_error(got, p.value), "end": end, "source": p.source,
            "uncertain": p.uncertain}


def published_errors(ends: tuple[str, ...] = ("low", "value", "high"),
                     devices: dict[str, Device] | None = None) -> list[dict[str, Any]]:
    """Every published figure against the model, at each end of the device bands."""
    devices = devices or load_devices()
    return [published_point(p, devices, end) for p in PUBLISHED for end in ends]
