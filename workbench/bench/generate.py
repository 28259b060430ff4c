"""Generation benchmark: prefill and decode tokens/s with the KV cache, against recomputing the prefix,
and how many distinct experts a decode step touches.

    workbench bench generate --preset small --json benchmarks/generate-cpu2.json

For each batch size B, B prompts of ``prompt_len`` bytes are continued greedily to the model's full
context ``seq_len`` (``workbench.inference.generate``, ``record_routing=False``), three ways that take
turns in every round (a slow spell of a shared machine then slows all three alike):

- **prefill**: the prompt batch through ``MoELM.forward_cached`` into an empty cache of ``seq_len``
  slots, as ``generate`` starts; tokens/s counts the B x prompt_len prompt tokens;
- **cached decode**: the generation with the cache; tokens/s counts the generated tokens of the
  decode steps (every step after the first token, which comes from the prefill), over their time;
- **recompute**: the same generation with ``use_cache=False``, where every step runs the whole
  prefix again (the baseline a cache is for), measured the same way.

Each figure is the median over ``repeats`` rounds after ``warmup`` untimed ones (a short generation
each), and the speedup is the median over rounds of the within-round ratio. The recompute baseline
costs O(N^2) in the generated length N, so at B > 1 it may be capped (``recompute_cap``): it then
generates only its first tokens, where its prefixes are shortest, so its tokens/s is an upper bound
and the speedup a lower bound; each row says whether it was capped. Batch 1 is never capped, so the
headline figure (``small``, batch 1) is always the full generation.

The weights are untrained (seeded by ``seed``): speed does not depend on what was learned, but the
routing does, so the distinct-experts table of an untrained model is a statement about its random
router, not about a trained one. Pass a trained ``MoELM`` to measure that.

Shape legend: B sequences, P prompt length, N tokens of a sequence, S decode steps, K experts per
token, E experts.
"""

from __future__ import annotations

import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from workbench.config import PRESETS, preset
from workbench.validation import check, check_choice, check_int

PREFILL_CALLS = 5  # prefill calls per round (a prefill is milliseconds: the round keeps their median)
WARMUP_TOKENS = 8  # tokens each warm-up generation makes


@dataclass(kw_only=True)
class GenerateBenchConfig:
    """What ``workbench bench generate`` measures; each field is one of its flags (the comment is its help).
    Checked as it is built: a bad value is a ``ValueError`` naming the field."""

    preset: str = field(default="small", metadata={"choices": PRESETS})  # model preset (untrained, seeded weights)
    batch_sizes: tuple[int, ...] = (1, 8, 64)  # comma-separated sequences per batch (B) to time
    prompt_len: int = 16  # bytes per prompt; each generation runs to the model's full context seq_len
    repeats: int = 3  # timed rounds (medians are reported)
    warmup: int = 1  # untimed rounds first (a short generation of each variant)
    recompute_cap: int | None = 32  # at batch > 1, the recompute baseline makes only this many tokens; none: all
    distinct_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # batch sizes of the distinct-experts table
    distinct_new_tokens: int = 64  # decode steps the distinct-experts table averages over
    threads: int | None = None  # torch CPU threads; none: torch's default
    seed: int = 0  # seeds the weights and the prompts

    def __post_init__(self) -> None:
        check_choice("preset", self.preset, PRESETS)
        check_generate_args(preset(self.preset), batch_sizes=self.batch_sizes, prompt_len=self.prompt_len,
                            repeats=self.repeats, warmup=self.warmup, recompute_cap=self.recompute_cap,
                            distinct_batch_sizes=self.distinct_batch_sizes,
                            distinct_new_tokens=self.distinct_new_tokens, threads=self.threads, seed=self.seed)

    def bench_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``bench_generate`` (all fields but the preset)."""
        return {k: v for k, v in asdict(self).items() if k != "preset"}

    def command(self, json_path: Any = None) -> str:
        """The ``workbench bench generate`` command line that measures exactly this (every flag spelt out)."""
        words = ["workbench", "bench", "generate"]
        for name, value in asdict(self).items():
            shown = "none" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            words += ["--" + name.replace("_", "-"), shown]
        if json_path is not None:
            words += ["--json", str(json_path)]
        return shlex.join(words)


def cache_bytes(model_cfg: Any, batch_size: int) -> int:
    """A lower bound of one generation's memory: the fp32 keys and values of every layer, ``seq_len``
    slots per sequence (``KVCache``), and one step's logits."""
    kv = 2 * model_cfg.n_layers * batch_size * model_cfg.seq_len * model_cfg.d_model
    return 4 * (kv + batch_size * model_cfg.seq_len * model_cfg.vocab_size)


def check_generate_args(model_cfg: Any, *, batch_sizes: Sequence[int], prompt_len: int, repeats: int, warmup: int,
                        recompute_cap: int | None, distinct_batch_sizes: Sequence[int], distinct_new_tokens: int,
                        threads: int | None, seed: int) -> None:
    """``ValueError`` naming the argument that ``bench_generate`` cannot run with."""
    from workbench.resources import check_fits

    check(len(batch_sizes) >= 1, "batch_sizes", "give at least one batch size, e.g. 1,8,64", batch_sizes)
    for name, sizes in (("batch_sizes", batch_sizes), ("distinct_batch_sizes", distinct_batch_sizes)):
        for b in sizes:
            check_int(name, b, 1)
            # before any tensor: --batch-sizes 100000000 would end in the allocator's traceback
            check_fits(name, b, cache_bytes(model_cfg, b), torch.device("cpu"),
                       f"a KV cache of {b:,} sequences x {model_cfg.seq_len} slots")
    L = model_cfg.seq_len
    # the decode figure needs two generated tokens: the first comes from the prefill
    check_int("prompt_len", prompt_len, 1)
    check(prompt_len <= L - 2, "prompt_len", f"must leave at least 2 tokens to generate in the context "
          f"seq_len={L}: at most {L - 2}", prompt_len)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    if recompute_cap is not None:
        check_int("recompute_cap", recompute_cap, 2)
    check_int("distinct_new_tokens", distinct_new_tokens, 1)
    check(prompt_len + distinct_new_tokens <= L, "distinct_new_tokens",
          f"the prompt ({prompt_len}) plus the new tokens must fit the context seq_len={L}: at most "
          f"{L - prompt_len}", distinct_new_tokens)
    if threads is not None:
        check_int("threads", threads, 1)
    check_int("seed", seed, 0)


# --- the pieces -------------------------------------------------------------------------------


def _model_of(preset_or_model: Any, seed: int) -> tuple[torch.nn.Module, str]:
    """(an ``MoELM``, its name): a preset built with ``torch.manual_seed(seed)``, or the model given
    (its training mode untouched: ``generate`` and ``bench_generate`` switch to evaluation and back)."""
    from workbench.model import MoELM

    if isinstance(preset_or_model, str):
        torch.manual_seed(seed)
        return MoELM(preset(preset_or_model)), preset_or_model
    check(isinstance(preset_or_model, MoELM), "preset_or_model", "must be a preset name ("
          + ", ".join(PRESETS) + ") or an MoELM", type(preset_or_model).__name__)
    return preset_or_model, "custom"


def make_prompts(batch_size: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``batch_size`` prompts of ``prompt_len`` printable ASCII bytes, drawn from ``seed`` (row b is
    the same for every batch size, so batch 1's prompt is batch 8's first)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (batch_size, prompt_len), generator=g).tolist()


def time_prefill(model: torch.nn.Module, prompts: list[list[int]]) -> float:
    """Seconds of one prefill: the prompt batch through ``forward_cached`` into an empty cache of
    ``seq_len`` slots, as ``generate`` runs it (the cache is allocated before the clock starts)."""
    from workbench.inference import KVCache

    tokens_BP = torch.tensor(prompts)
    cache = KVCache(model, len(prompts), model.cfg.seq_len)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.forward_cached(tokens_BP, cache)
        return time.perf_counter() - t0


def time_generation(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, *,
                    use_cache: bool) -> dict[str, Any]:
    """One greedy generation of ``new_tokens`` per prompt (``record_routing=False``), timed at every
    token: ``first_token_s`` (checks, cache, prefill, first sample), ``decode_s`` (every later step),
    ``total_s``, ``step_s_median`` and the generated ``tokens`` (to compare the variants)."""
    from workbench.inference import stream_generate

    stamps = []
    t0 = time.perf_counter()
    steps = stream_generate(model, prompts, new_tokens, record_routing=False, use_cache=use_cache)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result = done.value
            break
        stamps.append(time.perf_counter())
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    return {"first_token_s": stamps[0] - t0, "decode_s": stamps[-1] - stamps[0], "total_s": total,
            "step_s_median": statistics.median(gaps) if gaps else None, "tokens": result.new_tokens}


def uniform_distinct_experts(num_experts: int, top_k: int, batch_size: int) -> float:
    """Expected number of distinct experts that ``batch_size`` tokens touch when each picks ``top_k``
    of ``num_experts`` uniformly at random without replacement, independently of the others:

        E [1 - (1 - k/E)^B]

    One token leaves a given expert out with probability 1 - k/E (it picks k of the E equally
    likely), B independent tokens with probability (1 - k/E)^B, and by linearity of expectation
    the count of touched experts is E times the probability that one is touched. (The classic
    occupancy count, e.g. Feller, *An Introduction to Probability Theory*, vol. 1, ch. II.)
    """
    check_int("num_experts", num_experts, 1)
    check(isinstance(top_k, int) and 1 <= top_k <= num_experts, "top_k", f"must be in [1, {num_experts}]", top_k)
    check_int("batch_size", batch_size, 0)
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_size)


def distinct_experts_per_position(expert_ids_BNK: torch.Tensor, start: int, num_experts: int) -> torch.Tensor:
    """(S,) the number of distinct experts the B sequences' tokens at each position ``start``,
    ``start + 1``, ... touch together: with equal-length prompts of ``start`` tokens, position
    ``start + s`` is what decode step s feeds for every sequence. Expert -1 (no token) is not counted."""
    B, N, K = expert_ids_BNK.shape
    check(0 <= start < N, "start", f"must be a position in [0, {N})", start)
    # shape: (S, B*K), the experts of every assignment of each step
    ids_SX = expert_ids_BNK[:, start:].permute(1, 0, 2).reshape(N - start, B * K)
    # column 0 collects expert -1, so that it is dropped after the scatter
    touched_SE = torch.zeros(N - start, num_experts + 1, dtype=torch.bool)
    touched_SE.scatter_(1, ids_SX.clamp(min=-1) + 1, True)
    return touched_SE[:, 1:].sum(dim=1)


def distinct_experts_per_step(preset_or_model: Any, *, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                              prompt_len: int = 16, new_tokens: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Per batch size B: in greedy cached decode of B prompts, the distinct experts a decode step
    touches in each MoE layer (from ``generate(..., record_routing=True)``'s records), averaged over
    the ``new_tokens`` steps, next to the uniform-routing expectation E [1 - (1 - k/E)^B]
    (``uniform_distinct_experts``). Fewer than uniform: the batch's tokens share experts more than
    independent uniform routing would (a decode step then reads fewer expert weights)."""
    from workbench.inference import generate

    model, _ = _model_of(preset_or_model, seed)
    E, K = model.cfg.moe.num_experts, model.cfg.moe.top_k
    rows = []
    for B in batch_sizes:
        result = generate(model, make_prompts(B, prompt_len, seed), new_tokens, record_routing=True)
        per_layer = [distinct_experts_per_position(r.expert_ids, prompt_len, E).float().mean().item()
                     for r in result.routing]
        uniform = uniform_distinct_experts(E, K, B)
        mean = statistics.fmean(per_layer)
        rows.append({"batch": B, "steps": new_tokens, "num_experts": E, "top_k": K,
                     "per_layer": per_layer, "mean": mean, "uniform": uniform, "vs_uniform": mean / uniform})
    return rows


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class GenerateBenchResult:
    """What ``bench_generate`` measured; ``to_dict`` is its JSON."""

    model: dict  # preset, context, sizes; the weights are untrained
    settings: dict  # the arguments
    environment: dict  # harness.environment(): date, commit, CPU, threads, torch, load
    rows: list[dict] = field(default_factory=list)  # one per batch size
    distinct_experts: list[dict] = field(default_factory=list)  # distinct_experts_per_step's table
    notes: list[str] = field(default_factory=list)
    command: str | None = None  # the command line that produced it, when run from one

    def to_dict(self) -> dict:
        return asdict(self)


def bench_generate(preset_or_model: Any = "small", *, batch_sizes: Sequence[int] = (1, 8, 64), prompt_len: int = 16,
                   repeats: int = 3, warmup: int = 1, recompute_cap: int | None = 32,
                   distinct_batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), distinct_new_tokens: int = 64,
                   threads: int | None = None, seed: int = 0,
                   log: Callable[[str], Any] = lambda line: None) -> GenerateBenchResult:
    """Prefill, cached-decode and recompute tokens/s at each batch size, and their speedup (see the
    module docstring for what each counts); then ``distinct_experts_per_step`` at
    ``distinct_batch_sizes`` (none: skipped). ``preset_or_model``: a preset name (untrained weights
    from ``torch.manual_seed(seed)``) or an ``MoELM``. ``threads``: torch's CPU threads for the run."""
    from workbench.bench.harness import environment

    model, name = _model_of(preset_or_model, seed)
    cfg = model.cfg
    check_generate_args(cfg, batch_sizes=batch_sizes, prompt_len=prompt_len, repeats=repeats, warmup=warmup,
                        recompute_cap=recompute_cap, distinct_batch_sizes=distinct_batch_sizes,
                        distinct_new_tokens=distinct_new_tokens, threads=threads, seed=seed)
    threads_before, was_training = torch.get_num_threads(), model.training
    if threads is not None:
        torch.set_num_threads(threads)
    model.eval()  # the prefill is timed through forward_cached directly: no dropout, as generate runs it
    try:
        settings = {"batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "repeats": repeats,
                    "warmup": warmup, "recompute_cap": recompute_cap,
                    "distinct_batch_sizes": list(distinct_batch_sizes), "distinct_new_tokens": distinct_new_tokens,
                    "threads": threads, "seed": seed}
        result = GenerateBenchResult(model=_model_record(model, name), settings=settings, environment=environment())
        new = cfg.seq_len - prompt_len
        for B in batch_sizes:
            result.rows.append(_bench_batch(model, B, prompt_len, new, repeats, warmup,
                                            None if B == 1 else recompute_cap, seed, log))
        if distinct_batch_sizes:
            log(f"distinct experts per decode step, batch {','.join(map(str, distinct_batch_sizes))}")
            result.distinct_experts = distinct_experts_per_step(model, batch_sizes=distinct_batch_sizes,
                                                                prompt_len=prompt_len, new_tokens=distinct_new_tokens,
                                                                seed=seed)
    finally:
        torch.set_num_threads(threads_before)
        model.train(was_training)
    result.notes = [
        f"untrained weights (torch.manual_seed({seed})): speed does not depend on training; routing does",
        f"prompts: {prompt_len} random printable bytes each; greedy generation to the full context "
        f"seq_len={cfg.seq_len} ({new} new tokens), record_routing=False",
        "prefill tok/s: prompt tokens through forward_cached into an empty cache; decode tok/s: generated "
        "tokens after the first over the time of their steps; speedup: median over rounds of cached / recompute "
        "decode tok/s within the round",
    ]
    if any(r["recompute"]["capped"] for r in result.rows):
        result.notes.append(f"recompute capped at {recompute_cap} tokens at batch > 1: its first (cheapest) steps, "
                            "so its tok/s is an upper bound and the speedup a lower bound")
    return result


def _model_record(model: torch.nn.Module, name: str) -> dict[str, Any]:
    cfg = model.cfg
    return {"preset": name, "seq_len": cfg.seq_len, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "moe_layers": len(cfg.moe_layers), "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
            "expert_hidden": cfg.moe.expert_hidden, "router": cfg.moe.router, "params": cfg.num_params(),
            "active_params": cfg.num_active_params(), "weights": "untrained" if name != "custom" else "given"}


def _bench_batch(model: torch.nn.Module, B: int, P: int, new: int, repeats: int, warmup: int, cap: int | None,
                 seed: int, log: Callable[[str], Any]) -> dict[str, Any]:
    """One batch size: the three variants take turns, ``warmup`` untimed rounds then ``repeats``."""
    prompts = make_prompts(B, P, seed)
    recompute_new = new if cap is None else min(cap, new)
    for _ in range(warmup):
        time_prefill(model, prompts)
        for use_cache in (True, False):
            time_generation(model, prompts, min(WARMUP_TOKENS, new), use_cache=use_cache)
    prefill_s, cached, recompute = [], [], []
    for i in range(repeats):
        prefill_s.append(statistics.median(time_prefill(model, prompts) for _ in range(PREFILL_CALLS)))
        cached.append(time_generation(model, prompts, new, use_cache=True))
        recompute.append(time_generation(model, prompts, recompute_new, use_cache=False))
        log(f"batch {B}: round {i + 1}/{repeats}: prefill {prefill_s[-1] * 1e3:.1f} ms, cached decode "
            f"{cached[-1]['decode_s']:.2f} s, recompute {recompute[-1]['decode_s']:.2f} s")

    def decode_rate(run: dict[str, Any], tokens: int) -> float:
        return B * (tokens - 1) / run["decode_s"]  # the first token comes from the prefill

    cached_rates = [decode_rate(r, new) for r in cached]
    recompute_rates = [decode_rate(r, recompute_new) for r in recompute]
    # greedy decode of the same prompts: the recompute baseline must make the cached run's first tokens
    agree = all(r["tokens"] == [t[:recompute_new] for t in c["tokens"]] for c, r in zip(cached, recompute, strict=True))

    def variant(runs: list[dict[str, Any]], rates: list[float], tokens: int) -> dict[str, Any]:
        return {"new_tokens": tokens, "decode_tokens_per_s": statistics.median(rates),
                "decode_tokens_per_s_rounds": rates,
                "step_ms_median": 1e3 * statistics.median(r["step_s_median"] for r in runs),
                "first_token_ms_median": 1e3 * statistics.median(r["first_token_s"] for r in runs),
                "generate_tokens_per_s": statistics.median(B * tokens / r["total_s"] for r in runs)}

    ratios = [c / r for c, r in zip(cached_rates, recompute_rates, strict=True)]
    return {
        "batch": B, "prompt_len": P,
        "prefill": {"tokens": B * P, "ms_median": 1e3 * statistics.median(prefill_s),
                    "tokens_per_s": B * P / statistics.median(prefill_s), "ms_rounds": [1e3 * s for s in prefill_s]},
        "cached": variant(cached, cached_rates, new),
        "recompute": {**variant(recompute, recompute_rates, recompute_new), "capped": recompute_new < new},
        "speedup": statistics.median(ratios), "speedup_rounds": ratios, "tokens_agree": agree,
    }


def format_generate_bench(result: GenerateBenchResult | dict[str, Any]) -> str:
    """The readable tables: tokens/s per batch size, then the distinct experts per decode step."""
    r = result.to_dict() if isinstance(result, GenerateBenchResult) else result
    m, env = r["model"], r["environment"]
    lines = [f"generation, {m['preset']} ({m['weights']} weights, context {m['seq_len']}, {m['num_experts']} experts "
             f"top-{m['top_k']}), {env['threads']} threads, torch {env['torch']}, {env['cpu']}",
             f"prompt {r['settings']['prompt_len']} bytes, greedy to the full context; median of "
             f"{r['settings']['repeats']} rounds, the variants taking turns",
             f"{'preset':<8} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'step ms':>8} "
             f"{'recompute tok/s':>16} {'over':>5} {'speedup':>8}"]
    for row in r["rows"]:
        rc = row["recompute"]
        over = f"{rc['new_tokens']}*" if rc["capped"] else str(rc["new_tokens"])  # tokens the baseline made
        lines.append(f"{m['preset']:<8} {row['batch']:>5} {row['prefill']['tokens_per_s']:>14,.0f} "
                     f"{row['cached']['decode_tokens_per_s']:>13,.1f} {row['cached']['step_ms_median']:>8.2f} "
                     f"{rc['decode_tokens_per_s']:>16,.1f} {over:>5} {row['speedup']:>7.2f}x"
                     + ("" if row["tokens_agree"] else "  (greedy tokens differ between the variants)"))
    lines.append("step ms: median cached decode step; over: tokens the recompute baseline generated "
                 "(* capped: its cheapest steps only)")
    if r["distinct_experts"]:
        d0 = r["distinct_experts"][0]
        lines += ["", f"distinct experts per decode step and MoE layer (mean over {d0['steps']} steps; uniform: "
                      f"E(1-(1-k/E)^B), E={d0['num_experts']}, k={d0['top_k']})",
                  f"{'batch':>5} {'measured':>9} {'uniform':>8} {'ratio':>6}  per layer"]
        for d in r["distinct_experts"]:
            lines.append(f"{d['batch']:>5} {d['mean']:>9.2f} {d['uniform']:>8.2f} {d['vs_uniform']:>6.2f}  "
                         + " ".join(f"{v:.1f}" for v in d["per_layer"]))
    lines += ["", *(f"note: {n}" for n in r["notes"])]
    return "\n".join(lines)
