"""Layer benchmark: an MoE layer's forward + backward against a dense FFN of equal active FLOPs.

All variants are timed in one process, round-robin (variant A, B, C, A, B, C, ...). A ratio
is the median over rounds of the two variants' time ratio *within* a round, so a slow spell
of a shared machine (which lasts seconds) slows both sides of each ratio alike; the report
also gives each variant's median time.

The MoE layers are converted to the fused CPU kernels as a model is when it is built
(``workbench.kernels.cpu.convert_if_enabled``), so on CPU ``sorted`` and ``capacity`` run their
experts with the fused kernel when it builds; ``sorted_unfused`` times a readable copy of the
same ``sorted`` layer (one ``F.grouped_mm`` per weight matrix), to show what the kernels add.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from workbench.config import MoEConfig
from workbench.kernels import cpu as cpu_kernels
from workbench.moe import MoELayer, SwiGLUMLP
from workbench.validation import check, check_choice, check_int

UNFUSED_SUFFIX = "_unfused"
DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True)
class LayerBenchConfig:
    """What ``workbench bench layer`` times; each field is one of its flags (the comment is its help)."""

    tokens: int = 4096  # tokens in the batch (T)
    d_model: int = 256  # model width (D)
    expert_hidden: int = 512  # expert hidden size (H)
    num_experts: int = 16  # experts (E)
    top_k: int = 2  # experts per token (K)
    dispatches: tuple[str, ...] = ("sorted", "capacity", "loop")  # comma-separated dispatch names to time
    compare_unfused: bool = field(default=True, metadata={
        "flag": "unfused", "help": "on CPU, also time sorted without the fused expert kernel (sorted_unfused)"})
    capacity_factor: float = 1.25  # capacity dispatch: slots per expert = capacity_factor x T x K / E
    repeats: int = 30  # timed rounds
    warmup: int = 3  # untimed rounds first
    dtype: str = field(default="float32", metadata={"choices": DTYPES})  # parameter dtype
    device: str = "cpu"  # auto, cpu, cuda[:N], npu[:N] or mps
    seed: int = 0  # seeds the weights and the inputs

    def __post_init__(self) -> None:
        """Refuse bad values before anything is built, naming the field (as the configs do)."""
        from workbench.moe import DISPATCHES
        from workbench.train.trainer import resolve_device

        for name, minimum in (("tokens", 1), ("d_model", 1), ("repeats", 1), ("warmup", 0)):
            check_int(name, getattr(self, name), minimum)
        check_choice("dtype", self.dtype, DTYPES)
        check(bool(self.dispatches), "dispatches", "give at least one of " + ", ".join(DISPATCHES), self.dispatches)
        for dispatch in self.dispatches:
            check_choice("dispatches", dispatch, DISPATCHES)
        # the layer's own validation names num_experts, top_k, expert_hidden, capacity_factor
        for dispatch in self.dispatches:
            MoEConfig(num_experts=self.num_experts, top_k=self.top_k, expert_hidden=self.expert_hidden,
                      dispatch=dispatch, capacity_factor=self.capacity_factor)
        self.device = str(resolve_device(self.device))  # "auto" -> cuda or cpu; an unusable device is refused


@dataclass
class LayerBenchResult:
    config: dict
    threads: int
    flops_per_step: float  # forward + backward matmul FLOPs of the active expert FFN
    expert_kernel: str  # what ran the experts of sorted and capacity: fused_cpu or grouped_mm
    median_ms: dict[str, float] = field(default_factory=dict)
    gflops: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)  # paired throughput ratios, > 1 = faster

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_layer_bench(cfg: LayerBenchConfig, progress: bool = False) -> LayerBenchResult:
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    T, D, H, E, K = cfg.tokens, cfg.d_model, cfg.expert_hidden, cfg.num_experts, cfg.top_k

    def make_moe(dispatch: str) -> MoELayer:
        torch.manual_seed(cfg.seed)  # same router and experts for every dispatch
        moe_cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=H, dispatch=dispatch,
                            capacity_factor=cfg.capacity_factor)
        return MoELayer(D, moe_cfg).to(cfg.device, dtype)

    layers: dict[str, torch.nn.Module] = {"dense": SwiGLUMLP(D, K * H).to(cfg.device, dtype)}
    readable = {d: make_moe(d) for d in cfg.dispatches}
    layers.update({d: cpu_kernels.convert_if_enabled(copy.deepcopy(layer)) for d, layer in readable.items()})
    fused = torch.device(cfg.device).type == "cpu" and cpu_kernels.enabled() and cpu_kernels.kernel_available()
    if fused and cfg.compare_unfused and "sorted" in cfg.dispatches:
        layers["sorted" + UNFUSED_SUFFIX] = readable["sorted"]
    x = torch.randn(1, T, D, device=cfg.device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(1, T, D, device=cfg.device, dtype=dtype)

    def step(name: str) -> float:
        layer = layers[name]
        _sync(cfg.device)
        t0 = time.perf_counter()
        out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad_y)
        _sync(cfg.device)
        elapsed = time.perf_counter() - t0
        x.grad = None
        layer.zero_grad(set_to_none=True)
        return elapsed

    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(cfg.warmup + cfg.repeats):
        for name in layers:
            t = step(name)
            if i >= cfg.warmup:
                times[name].append(t)
        if progress:
            print(f"\rrepeat {i + 1}/{cfg.warmup + cfg.repeats}", end="", flush=True)
    if progress:
        print()

    flops = 6.0 * T * 3 * D * K * H  # fwd (2 per MAC) x 3 for fwd + bwd; 3 matrices per SwiGLU
    result = LayerBenchResult(config=asdict(cfg), threads=torch.get_num_threads(), flops_per_step=flops,
                              expert_kernel="fused_cpu" if fused else "grouped_mm")
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        result.median_ms[name] = med * 1e3
        result.gflops[name] = flops / med / 1e9
    def paired(baseline: str, name: str) -> float:
        return statistics.median(b / t for b, t in zip(times[baseline], times[name], strict=True))

    variants = [name for name in layers if name != "dense"]
    for name in variants:
        result.ratios[f"{name}_vs_dense"] = paired("dense", name)
        if "loop" in layers and name != "loop":
            result.ratios[f"{name}_vs_loop"] = paired("loop", name)
    if "sorted" + UNFUSED_SUFFIX in layers:
        result.ratios["sorted_vs_sorted" + UNFUSED_SUFFIX] = paired("sorted" + UNFUSED_SUFFIX, "sorted")
    return result


def format_layer_bench(r: LayerBenchResult) -> str:
    c = r.config
    lines = [
        f"MoE layer forward+backward, {c['device']} {c['dtype']}, {r.threads} threads: "
        f"{c['tokens']} tokens, d_model {c['d_model']}, {c['num_experts']} experts x hidden "
        f"{c['expert_hidden']}, top-{c['top_k']}; dense baseline hidden {c['top_k'] * c['expert_hidden']} "
        f"(same active FLOPs: {r.flops_per_step / 1e9:.2f} GFLOP per step); experts run by {r.expert_kernel}",
        f"{'variant':<15} {'median ms':>10} {'GFLOP/s':>9}",
    ]
    for name, ms in r.median_ms.items():
        lines.append(f"{name:<15} {ms:>10.2f} {r.gflops[name]:>9.1f}")
    lines.append("throughput ratios (median of per-round ratios): "
                 + ", ".join(f"{k} {v:.3f}x" for k, v in r.ratios.items()))
    return "\n".join(lines)
