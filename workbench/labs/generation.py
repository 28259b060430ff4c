"""The generation lab (``notebooks/06_generation.ipynb``): what it trains, measures and judges.

What it trains (``train_models``): the ``tiny`` preset on the built-in corpus at several seeds, each
run once and kept under ``runs/cache/06_generation/`` (a run directory per seed, named by a hash of
its configs and the training code, as ``workbench.experiments`` keys its cache), so a second pass
of the notebook loads the checkpoints instead of training.

What it measures, per seed:

- ``display_samples``: a continuation of one prompt per domain with the routing of every token,
  generated and teacher-forced (the figure of the notebook's widget);
- ``locality_frame``: temporal locality of routing (``workbench.analysis.inference``) in three
  conditions: ``generated`` (the pairs of generated tokens, as generation routed them),
  ``forced`` (the same text, teacher-forced through ``model.forward``) and ``validation``
  (held-out windows of every domain, teacher-forced: Mixtral's setting, which measured on The
  Pile's validation set); and how often generation and teacher forcing route alike;
- ``knobs_frame``: ``workbench.analysis.inference.knob_table`` for every inference-time knob;
- ``decode_speed``: prefill and decode tokens/s with and without the KV cache, and the distinct
  experts a decode step touches (``workbench.bench.generate``).

How it judges (``locality_claim``), thresholds fixed here before any run:

- **above chance**: in an MoE layer, the first-choice repeat rate exceeds its chance rate (sum_e
  p_e^2 of the same seed and layer) beyond seed noise: the mean over seeds of rate - chance is
  more than ``NOISE_SE`` of its paired standard errors (std over seeds / sqrt(seeds)). The claim
  holds when that is so in at least ``min_layers(L)`` = all but one of the L MoE layers;
- **deeper is more local**: the per-seed least-squares slope of the ratio rate / chance against
  the MoE layer's depth is positive beyond seed noise (mean slope > ``NOISE_SE`` paired SE).

Jiang et al. 2024 (arXiv:2401.04088, section 5) report both for Mixtral 8x7B (first-choice
repeats well above the 12.5% of uniform routing at layers 15 and 31, close to it at layer 0).

Knobs "keep quality" (``knob_summary``) when the mean validation loss rises by less than
``QUALITY_LOSS`` (relative) and the mean arithmetic exact match falls by less than
``QUALITY_ARITHMETIC`` (absolute) from the trained model's, over the same seeds.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from workbench.analysis import inference as inf
from workbench.config import ModelConfig
from workbench.labs.balancing import NOISE_SE
from workbench.labs.modes import require_files
from workbench.train.config import TrainConfig
from workbench.validation import check

# --- what it generates from ------------------------------------------------------------------------

# One hand-written prompt per domain of the built-in corpus, for the widget.
DISPLAY_PROMPTS = {
    "code": "def read_lines(path):\n    ",
    "prose": "The for statement is used to ",
    "math": "(12 + 7) * 3 =",
    "records": "U+0416 | CYRILLIC ",
}
CONDITIONS = ("generated", "forced", "validation")
CONDITION_LABELS = {"generated": "generated text, as generated", "forced": "the same text, teacher-forced",
                    "validation": "validation text, teacher-forced"}

# --- the claim's thresholds (fixed before any run) -----------------------------------------------

CLAIM_METRIC = "top1"  # Mixtral's "first choice"; the top-k overlap is reported beside it
CLAIM_CONDITIONS = ("generated", "validation")  # the forced condition is the generated text again


def min_layers(num_layers: int) -> int:
    """MoE layers in which locality must beat chance for the claim to hold: all but one."""
    return max(1, num_layers - 1)


QUALITY_LOSS = 0.01  # a knob keeps quality: validation loss up by less than 1% ...
QUALITY_ARITHMETIC = 0.02  # ... and arithmetic exact match down by less than 2 points


# --- training, through a run cache -------------------------------------------------------------------


def _run_key(base: ModelConfig, train: TrainConfig) -> str:
    from workbench.experiments import NOT_IN_KEY, code_version

    train_key = {k: v for k, v in train.to_dict().items() if k not in NOT_IN_KEY}
    blob = json.dumps({"model": base.to_dict(), "train": train_key, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_dir_for(base: ModelConfig, train: TrainConfig, seed: int, cache_dir: str | Path) -> Path:
    """Where seed ``seed``'s run lives: ``cache_dir/06_generation/seed<seed>-<hash of configs and code>``."""
    seeded = replace(train, seed=seed)
    return Path(cache_dir) / "06_generation" / f"seed{seed}-{_run_key(base, seeded)}"


def _finished(run_dir: Path) -> bool:
    from workbench.train.rundir import read_run_info

    try:
        info = read_run_info(run_dir)
    except Exception:  # an unreadable run.json: train again
        return False
    return info is not None and info.get("status") == "finished"


def _train_one(model: dict[str, Any], train: dict[str, Any]) -> float:
    """Train one run into ``train["run_dir"]`` (a worker process); its wall time in seconds."""
    from workbench.train.trainer import Trainer

    t0 = time.perf_counter()
    Trainer(ModelConfig.from_dict(model), TrainConfig.from_dict(train), overwrite=True).fit()
    return time.perf_counter() - t0


def train_models(base: ModelConfig, train: TrainConfig, seeds: list[int], cache_dir: str | Path, *,
                 jobs: int = 2, say=print) -> dict[int, dict[str, Any]]:
    """Train (or find in the cache) one run per seed; per seed its ``run_dir``, whether it was
    ``cached`` and its training ``wall_s`` (NaN when cached). ``jobs`` runs train at once, each in
    a worker process with an equal share of the CPU threads (as ``run_experiments`` does)."""
    import concurrent.futures as cf

    runs: dict[int, dict[str, Any]] = {}
    todo = []
    for seed in seeds:
        run_dir = run_dir_for(base, train, seed, cache_dir)
        cached = _finished(run_dir)
        runs[seed] = {"run_dir": str(run_dir), "cached": cached, "wall_s": float("nan")}
        if cached:
            say(f"seed {seed}: from the cache ({run_dir})")
        else:
            todo.append(seed)
    if not todo:
        return runs
    args = {s: (base.to_dict(), replace(train, seed=s, run_dir=runs[s]["run_dir"], progress=False).to_dict())
            for s in todo}
    if jobs <= 1 or len(todo) == 1:
        for s in todo:
            say(f"seed {s}: training {train.steps} steps")
            runs[s]["wall_s"] = _train_one(*args[s])
            say(f"seed {s}: trained in {runs[s]['wall_s']:.0f} s")
        return runs
    from joblib.externals.loky import get_reusable_executor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = get_reusable_executor(max_workers=jobs, initializer=_worker_init, initargs=(threads,), reuse=False)
    try:
        futures = {}
        for s in todo:
            say(f"seed {s}: training {train.steps} steps")
            futures[pool.submit(_train_one, *args[s])] = s
        for fut in cf.as_completed(futures):
            s = futures[fut]
            runs[s]["wall_s"] = fut.result()
            say(f"seed {s}: trained in {runs[s]['wall_s']:.0f} s")
    finally:
        pool.shutdown(wait=True, kill_workers=True)
    return runs


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("WANDB_MODE", "disabled")


def load_models(runs: dict[int, dict[str, Any]]) -> dict[int, Any]:
    """Each seed's trained model (``workbench.load_model``), in evaluation mode."""
    from workbench.load import load_model

    return {seed: load_model(r["run_dir"]) for seed, r in runs.items()}


# --- samples for the widget ----------------------------------------------------------------------


def _ranked(routing: inf.LayerRouting, b: int, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """The experts of sequence b's first n tokens, each token's sorted by gate (first choice first)."""
    ids, gates = routing.expert_ids[b, :n], routing.gates[b, :n]
    order = gates.argsort(dim=-1, descending=True)
    return ids.gather(-1, order).tolist(), [[round(g, 4) for g in row] for row in gates.gather(-1, order).tolist()]


def display_samples(model: Any, prompts: dict[str, str] | None = None, *, new_tokens: int = 64,
                    temperature: float = 0.8, seed: int = 0) -> list[dict[str, Any]]:
    """One continuation per prompt (default ``DISPLAY_PROMPTS``) with, for every token, its experts
    and gates in each MoE layer as generation routed it (``experts``, ``gates``) and as the same
    text teacher-forced routes it (``forced_experts``, ``forced_gates``), first choice first."""
    from workbench.inference import generate

    prompts = DISPLAY_PROMPTS if prompts is None else prompts
    result = generate(model, list(prompts.values()), new_tokens, temperature=temperature, seed=seed)
    forced = inf.teacher_forced_routing(model, result.tokens)
    samples = []
    for b, domain in enumerate(prompts):
        n = len(result.tokens[b])
        layers = []
        for g, f in zip(result.routing, forced, strict=True):
            experts, gates = _ranked(g, b, n)
            forced_experts, forced_gates = _ranked(f, b, n)
            layers.append({"block": g.block, "experts": experts, "gates": gates, "forced_experts": forced_experts,
                           "forced_gates": forced_gates})
        samples.append({"domain": domain, "prompt": prompts[domain], "prompt_len": len(result.prompt_tokens[b]),
                        "tokens": result.tokens[b], "text": result.texts[b], "num_experts": model.cfg.moe.num_experts,
                        "layers": layers})
    return samples


# A colour per expert (tab20's pale half after the strong one, so 20 experts stay distinguishable).
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
            "#dbdb8d", "#9edae5"]


def expert_colour(expert: int) -> str:
    return _PALETTE[expert % len(_PALETTE)]


def _byte_html(byte: int) -> str:
    if byte == 0x0A:
        return "&#8629;<br>"
    if byte == 0x20:
        return "&nbsp;"
    if 0x21 <= byte <= 0x7E:
        return html.escape(chr(byte))
    return f"<small>\\x{byte:02x}</small>"


def routing_html(sample: dict[str, Any], layer: int, *, forced: bool = False) -> str:
    """The sample's text, each byte on the colour of its first-choice expert in MoE layer ``layer``
    (generation's routing, or the teacher-forced one with ``forced``); the prompt underlined; a
    byte whose top-k set differs between generation and teacher forcing outlined in black. Hover
    a byte for its experts and gates."""
    routing = sample["layers"][layer]
    key = "forced_" if forced else ""
    experts, gates = routing[f"{key}experts"], routing[f"{key}gates"]
    spans = []
    for j, byte in enumerate(sample["tokens"]):
        first = experts[j][0]
        differs = sorted(routing["experts"][j]) != sorted(routing["forced_experts"][j])
        style = [f"background:{expert_colour(first)}55", "font-family:monospace", "padding:0 1px"]
        if j < sample["prompt_len"]:
            style.append("text-decoration:underline")
        if differs:
            style.append("outline:1px solid black")
        title = ", ".join(f"expert {e}: {g:.2f}" for e, g in zip(experts[j], gates[j], strict=True))
        spans.append(f'<span style="{";".join(style)}" title="{title}">{_byte_html(byte)}</span>')
    E = sample.get("num_experts") or 1 + max(e for row in routing["experts"] + routing["forced_experts"] for e in row)
    legend = " ".join(f'<span style="background:{expert_colour(e)}55;padding:0 4px;font-family:monospace">'
                      f"expert {e}</span>" for e in range(E))
    head = (f"<b>{html.escape(sample['domain'])}</b>, MoE layer {layer} (block {routing['block']}), "
            f"{'teacher-forced' if forced else 'as generated'}: first-choice expert per byte (prompt underlined)")
    return f'<div style="line-height:1.9">{head}<br>{legend}<br>{"".join(spans)}</div>'


def sample_agreement(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sample and MoE layer: the share of tokens whose top-k set (and first choice) is the same
    in generation and teacher forcing."""
    rows = []
    for s in samples:
        for layer, r in enumerate(s["layers"]):
            n = len(r["experts"])
            same_set = sum(sorted(a) == sorted(b) for a, b in zip(r["experts"], r["forced_experts"], strict=True))
            same_first = sum(a[0] == b[0] for a, b in zip(r["experts"], r["forced_experts"], strict=True))
            rows.append({"domain": s["domain"], "layer": layer, "tokens": n, "set": same_set / n,
                         "top1": same_first / n})
    return rows


# --- temporal locality over seeds ----------------------------------------------------------------


def claim_prompts(data: Any, prompt_tokens: int, per_domain: int) -> tuple[list[list[int]], list[str]]:
    """The first ``prompt_tokens`` tokens of up to ``per_domain`` validation windows of each
    domain (held-out text the model never trained on), and each prompt's domain."""
    prompts, domains = [], []
    for domain, batches in data.val_batches().items():
        windows = torch.cat([b.tokens for b in batches])[:per_domain, :prompt_tokens]
        prompts.extend(windows.tolist())
        domains.extend([domain] * windows.shape[0])
    return prompts, domains


def locality_frame(models: dict[int, Any], data: Any, *, prompt_tokens: int = 32, new_tokens: int = 96,
                   per_domain: int = 16, temperature: float = 0.8, shuffles: int = 16, say=print) -> tuple[Any, Any]:
    """Temporal locality per (seed, condition, MoE layer, metric) (``CONDITIONS``), and the agreement
    of generation with teacher forcing per (seed, layer). Generation samples at ``temperature``
    with the run's seed from ``claim_prompts``; the generated condition counts the pairs of
    generated tokens, the forced one the same pairs teacher-forced."""
    import pandas as pd

    from workbench.inference import generate

    prompts, _ = claim_prompts(data, prompt_tokens, per_domain)
    start = [len(p) for p in prompts]
    rows, agreement = [], []
    for seed, model in models.items():
        t0 = time.perf_counter()
        E = model.cfg.moe.num_experts
        result = generate(model, prompts, new_tokens, temperature=temperature, seed=seed)
        forced = inf.teacher_forced_routing(model, result.tokens)
        val = inf.batches_routing(model, [b for bs in data.val_batches().values() for b in bs])
        tables = {"generated": inf.locality_table(result.routing, E, start_B=start, shuffles=shuffles, seed=seed),
                  "forced": inf.locality_table(forced, E, start_B=start, shuffles=shuffles, seed=seed),
                  "validation": inf.locality_table(val, E, shuffles=shuffles, seed=seed)}
        for condition, table in tables.items():
            rows.extend({"seed": seed, "condition": condition, **r} for r in table)
        agreement.extend({"seed": seed, **r} for r in inf.routing_agreement(result.routing, forced, start_B=start))
        say(f"seed {seed}: locality of {len(prompts)} generations of {new_tokens} tokens and "
            f"{val[0].expert_ids.shape[0]} validation windows in {time.perf_counter() - t0:.1f} s")
    return pd.DataFrame(rows), pd.DataFrame(agreement)


def _mean_se(values: Any) -> tuple[float, float, float]:
    """Mean, standard deviation and standard error over seeds (NaN spread with one seed)."""
    n = len(values)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    return mean, std, std / math.sqrt(n) if n > 1 else float("nan")


def _slope(layers: list[int], values: list[float]) -> float:
    x_mean, y_mean = sum(layers) / len(layers), sum(values) / len(values)
    den = sum((x - x_mean) ** 2 for x in layers)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(layers, values, strict=True)) / den if den else 0.0


def locality_claim(frame: Any, condition: str, metric: str = CLAIM_METRIC, baseline: str = "chance") -> dict[str, Any]:
    """The two parts of the claim (module docstring) in one condition, from ``locality_frame``'s
    rows: per layer the ratio's mean and spread over seeds and the paired test of rate - chance;
    the depth slope; ``above_chance`` and ``deeper_more_local`` (None with one seed) and
    ``verdict``, a sentence computed from them. ``baseline``: ``chance`` (the claim's), or
    ``shuffled`` (the within-sequence permutation, which also keeps each sequence's load)."""
    check(baseline in ("chance", "shuffled"), "baseline", "must be 'chance' or 'shuffled'", baseline)
    rows = frame[(frame["condition"] == condition) & (frame["metric"] == metric)].copy()
    rows["chance"] = rows[baseline]
    rows["ratio"] = rows["rate"] / rows[baseline]
    check(len(rows) > 0, "condition", f"must be a condition of the frame ({sorted(set(frame['condition']))})",
          condition)
    layers = sorted(rows["layer"].unique())
    seeds = sorted(rows["seed"].unique())
    per_layer = []
    for layer in layers:
        r = rows[rows["layer"] == layer].set_index("seed").loc[seeds]
        ratio, ratio_std, _ = _mean_se(r["ratio"])
        excess, _, se = _mean_se(r["rate"] - r["chance"])  # paired: rate and chance of the same run
        holds = None if math.isnan(se) else bool(excess > NOISE_SE * se)
        per_layer.append({"layer": int(layer), "rate": float(r["rate"].mean()), "chance": float(r["chance"].mean()),
                          "ratio": ratio, "ratio_std": ratio_std, "excess": excess, "excess_se": se,
                          "z": excess / se if se and not math.isnan(se) else float("nan"), "holds": holds})
    slopes = rows.pivot_table(index="seed", columns="layer", values="ratio").apply(
        lambda row: _slope([int(c) for c in row.index], list(row.values)), axis=1)
    slope, slope_std, slope_se = _mean_se(slopes)
    needed = min_layers(len(layers))
    judged = len(seeds) > 1
    held = sum(bool(p["holds"]) for p in per_layer)
    out = {"condition": condition, "metric": metric, "baseline": baseline, "seeds": len(seeds), "layers": per_layer,
           "held": held,
           "needed": needed, "above_chance": (held >= needed) if judged else None,
           "slope": slope, "slope_std": slope_std, "slope_se": slope_se,
           "deeper_more_local": bool(slope > NOISE_SE * slope_se) if judged else None}
    out["verdict"] = _locality_verdict(out)
    return out


def _locality_verdict(c: dict[str, Any]) -> str:
    what = "first-choice repeats" if c["metric"] == "top1" else "top-k overlaps"
    per_layer = "; ".join(
        f"layer {p['layer']}: {p['rate']:.3f} vs {p['chance']:.3f}, ratio {p['ratio']:.2f}"
        + (f" ± {p['ratio_std']:.2f}" if p["ratio_std"] == p["ratio_std"] else "")
        + (f", excess {p['excess']:+.3f} = {p['z']:+.1f} paired SE" if p["z"] == p["z"] else "")
        for p in c["layers"])
    against = "chance" if c["baseline"] == "chance" else "the within-sequence permutation"
    head = (f"Temporal locality ({what}, {CONDITION_LABELS[c['condition']]}, against {against}, "
            f"{c['seeds']} seed(s))")
    if c["above_chance"] is None:
        return f"{head}: cannot be judged with one seed (no seed noise to judge by). {per_layer}."
    above = (f"above chance beyond seed noise (> {NOISE_SE:g} paired SE) in {c['held']} of {len(c['layers'])} MoE "
             f"layers (needed: {c['needed']}): " + ("REPRODUCED" if c["above_chance"] else "NOT REPRODUCED"))
    depth = (f"deeper layers more local: slope of the ratio per MoE layer {c['slope']:+.3f} ± {c['slope_std']:.3f} "
             f"(= {c['slope'] / c['slope_se'] if c['slope_se'] else float('nan'):+.1f} paired SE, threshold "
             f"+{NOISE_SE:g}): " + ("REPRODUCED" if c["deeper_more_local"] else "NOT REPRODUCED"))
    return f"{head}: {above}; {depth}. Per layer (mean ± std over seeds): {per_layer}."


def locality_summary(frame: Any) -> Any:
    """Mean and std over seeds of rate, chance and ratio per (condition, metric, layer)."""
    return frame.groupby(["condition", "metric", "layer"], sort=False)[["rate", "chance", "ratio", "uniform"]].agg(
        ["mean", "std"])


# --- knobs over seeds ----------------------------------------------------------------------------


def knob_settings(top_k: int, *, capacity_factors: tuple[float, ...] = (2.0, 1.0, 0.5),
                  drop_fractions: tuple[float, ...] = (0.25, 0.5)) -> list[inf.Knob]:
    """The lab's knob settings: top-(k-1) with and without renormalisation, dropping the least-used
    experts, and inference capacity."""
    settings = []
    if top_k > 1:
        settings += [inf.Knob("top_k", top_k - 1, renormalize=True), inf.Knob("top_k", top_k - 1, renormalize=False)]
    settings += [inf.Knob("drop", f) for f in drop_fractions]
    settings += [inf.Knob("capacity", c) for c in capacity_factors]
    return settings


def knobs_frame(models: dict[int, Any], data: Any, problems: list[Any], settings: list[inf.Knob],
                say=print) -> Any:
    """``knob_table`` per seed, one row per (seed, setting)."""
    import pandas as pd

    rows = []
    for seed, model in models.items():
        t0 = time.perf_counter()
        rows.extend({"seed": seed, **r} for r in inf.knob_table(model, data, problems, settings))
        say(f"seed {seed}: {len(settings) + 1} knob settings in {time.perf_counter() - t0:.1f} s")
    return pd.DataFrame(rows)


def knob_summary(frame: Any) -> Any:
    """Per setting: mean and std over seeds of every measure, the paired difference from the
    trained model of validation loss and arithmetic (mean and SE over seeds), and
    ``keeps_quality`` (``QUALITY_LOSS``, ``QUALITY_ARITHMETIC``)."""
    import pandas as pd

    measures = ["val_loss", "arithmetic", "experts_per_token", "dropped_fraction",
                *[c for c in frame.columns if c.startswith("bpb/")]]
    trained = frame[frame["setting"] == "trained"].set_index("seed")
    rows = []
    for setting, group in frame.groupby("setting", sort=False):
        g = group.set_index("seed")
        row: dict[str, Any] = {"setting": setting}
        for m in measures:
            row[m] = float(g[m].mean())
            row[f"{m}_std"] = float(g[m].std(ddof=1)) if len(g) > 1 else float("nan")
        for m in ("val_loss", "arithmetic"):
            d = g[m] - trained.loc[g.index, m]
            row[f"d_{m}"], _, row[f"d_{m}_se"] = _mean_se(d)
        loss_ok = row["d_val_loss"] < QUALITY_LOSS * float(trained["val_loss"].mean())
        arith_ok = math.isnan(row["d_arithmetic"]) or row["d_arithmetic"] > -QUALITY_ARITHMETIC
        row["keeps_quality"] = bool(loss_ok and arith_ok)
        rows.append(row)
    return pd.DataFrame(rows).set_index("setting")


def knob_takeaways(summary: Any) -> list[str]:
    """One sentence per knob setting, from ``knob_summary``, naming the domain whose bits per byte
    rise most; and one on arithmetic when it cannot tell the settings apart."""
    lines = []
    base = summary.loc["trained"]
    domains = [c[4:] for c in summary.columns if c.startswith("bpb/") and not c.endswith("_std")]
    for setting, r in summary.drop(index="trained").iterrows():
        arith = ("arithmetic not measured (decoding is dropless)" if math.isnan(r["arithmetic"]) else
                 f"arithmetic {r['arithmetic']:.1%} ({r['d_arithmetic']:+.1%} ± {r['d_arithmetic_se']:.1%})")
        loss = (f"validation loss {r['val_loss']:.4f} ({r['d_val_loss']:+.4f} ± {r['d_val_loss_se']:.4f} paired SE "
                f"vs {base['val_loss']:.4f} trained)")
        if domains:
            worst = max(domains, key=lambda d: r[f"bpb/{d}"] - base[f"bpb/{d}"])
            loss += f", most on {worst} ({r[f'bpb/{worst}'] - base[f'bpb/{worst}']:+.3f} bits per byte)"
        compute = (f"{r['experts_per_token']:.2f} experts per token per layer, {r['dropped_fraction']:.1%} of "
                   "assignments dropped")
        verdict = "keeps quality" if r["keeps_quality"] else "costs quality"
        lines.append(f"{setting}: {loss}, {arith}, {compute}: {verdict} (thresholds: loss +{QUALITY_LOSS:.0%}, "
                     f"arithmetic -{QUALITY_ARITHMETIC:.0%}).")
    measured = summary["arithmetic"].dropna()
    if len(measured) and (measured == measured.iloc[0]).all():
        lines.append(f"Arithmetic exact match is {measured.iloc[0]:.1%} for the trained model and for every setting "
                     "decoded: at this scale it cannot tell the knobs apart; the losses do.")
    return lines


# --- decode speed --------------------------------------------------------------------------------


def decode_speed(model: Any, *, batch_sizes: tuple[int, ...] = (1, 4, 16, 64), prompt_len: int = 32,
                 repeats: int = 3, warmup: int = 1, recompute_cap: int | None = 32,
                 distinct_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), distinct_new_tokens: int = 64,
                 say=print) -> dict[str, Any]:
    """``workbench.bench.generate.bench_generate`` on ``model``: prefill, cached-decode and
    recompute (no cache) tokens/s per batch size, greedy to the full context, and the distinct
    experts per decode step beside E (1 - (1 - k/E)^B); its JSON-ready dict."""
    from workbench.bench.generate import bench_generate

    t0 = time.perf_counter()
    result = bench_generate(model, batch_sizes=batch_sizes, prompt_len=prompt_len, repeats=repeats, warmup=warmup,
                            recompute_cap=recompute_cap, distinct_batch_sizes=distinct_batch_sizes,
                            distinct_new_tokens=distinct_new_tokens, threads=torch.get_num_threads())
    say(f"decode speed over batch sizes {list(batch_sizes)} in {time.perf_counter() - t0:.1f} s")
    return _plain(result.to_dict())


def speed_table(result: dict[str, Any]) -> Any:
    """One row per batch size from ``decode_speed``: prefill tokens/s, the time to the first token
    with and without the cache, cached and recompute decode tokens/s and their ratio."""
    import pandas as pd

    rows = []
    for r in result["rows"]:
        rows.append({"batch": r["batch"], "prefill_tok_s": r["prefill"]["tokens_per_s"],
                     "first_token_ms_cache": r["cached"]["first_token_ms_median"],
                     "first_token_ms_no_cache": r["recompute"]["first_token_ms_median"],
                     "decode_tok_s_cache": r["cached"]["decode_tokens_per_s"],
                     "decode_tok_s_no_cache": r["recompute"]["decode_tokens_per_s"],
                     "no_cache_capped": r["recompute"]["capped"], "speedup": r["speedup"],
                     "tokens_agree": r["tokens_agree"]})
    return pd.DataFrame(rows).set_index("batch")


# --- figures -------------------------------------------------------------------------------------


def plot_locality(frame: Any, metric: str = CLAIM_METRIC, conditions: tuple[str, ...] = CLAIM_CONDITIONS, axes=None):
    """Per condition, the ratio rate / chance per MoE layer: a line per seed, the mean in black, 1
    (random routing with the same load) dashed."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(conditions), figsize=(5 * len(conditions), 3.2), squeeze=False)
        axes = axes[0]
    for ax, condition in zip(axes, conditions, strict=True):
        rows = frame[(frame["condition"] == condition) & (frame["metric"] == metric)]
        table = rows.pivot_table(index="layer", columns="seed", values="ratio")
        for seed in table.columns:
            ax.plot(table.index, table[seed], "-o", ms=3, lw=0.8, alpha=0.6, label=f"seed {seed}")
        ax.plot(table.index, table.mean(axis=1), "-", color="black", lw=2, label="mean")
        ax.axhline(1.0, ls="--", color="grey", lw=1)
        ax.set_xticks(list(table.index))
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("repeat rate / chance")
        what = "first choice" if metric == "top1" else "top-k overlap"
        ax.set_title(f"{what}: {CONDITION_LABELS[condition]}", fontsize=10)
        ax.legend(fontsize=7)
    return axes[0].figure


def plot_knobs(summary: Any, axes=None):
    """Left: the change in validation loss from the trained model per setting (mean ± paired SE
    over seeds). Right: arithmetic exact match per setting (mean ± std over seeds)."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 3.4))
    names = list(summary.index)
    ys = range(len(names))
    axes[0].barh(ys, summary["d_val_loss"], xerr=summary["d_val_loss_se"].fillna(0), color="tab:blue", alpha=0.7)
    axes[0].set_yticks(list(ys), names, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].axvline(0, color="black", lw=0.8)
    axes[0].set_xlabel("validation loss - trained (nats/byte)")
    axes[0].set_title("cost in validation loss (± paired SE)", fontsize=10)
    arith = summary["arithmetic"]
    axes[1].barh(ys, arith.fillna(0), xerr=summary["arithmetic_std"].fillna(0), color="tab:green", alpha=0.7)
    for y, value in zip(ys, arith, strict=True):
        label = "not measured: decoding is dropless" if math.isnan(value) else f"{value:.1%}"
        axes[1].text(0, y, " " + label, va="center", fontsize=7)
    axes[1].set_yticks(list(ys), names, fontsize=8)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("arithmetic exact match")
    axes[1].set_title("held-out arithmetic, greedy (± std over seeds)", fontsize=10)
    return axes[0].figure


def plot_decode_speed(result: dict[str, Any], axes=None):
    """Left: prefill and decode tokens/s against batch size, decode with the KV cache and without
    it (recomputing the prefix). Right: distinct experts per decode step (mean over MoE layers)
    against uniform routing's E (1 - (1 - k/E)^B)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 3.4))
    table = speed_table(result)
    axes[0].plot(table.index, table["prefill_tok_s"], "-o", label="prefill")
    axes[0].plot(table.index, table["decode_tok_s_cache"], "-o", label="decode, KV cache")
    axes[0].plot(table.index, table["decode_tok_s_no_cache"], "--o", label="decode, no cache (recompute)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("batch size (sequences)")
    axes[0].set_ylabel("tokens / s")
    axes[0].set_title(f"generation speed ({result['environment'].get('threads', '?')} thread(s))", fontsize=10)
    axes[0].legend(fontsize=7)
    distinct = pd.DataFrame(result["distinct_experts"])
    if len(distinct):
        axes[1].plot(distinct["batch"], distinct["mean"], "-o", label="measured (mean over MoE layers)")
        axes[1].plot(distinct["batch"], distinct["uniform"], "--", color="black", label="uniform: E (1 - (1 - k/E)^B)")
        axes[1].set_xscale("log", base=2)
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("batch size (sequences)")
    axes[1].set_ylabel("distinct experts per decode step")
    axes[1].set_title("experts a decode step reads", fontsize=10)
    return axes[0].figure


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data (dataclasses, frames and tensors turned into lists and dicts)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # a DataFrame
        return value.to_dict(orient="records")
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- the committed full-mode results (the notebook's results mode) ------------------------------

RESULTS_FILES = ("results.json",)


def machine() -> str:
    """This machine in one line: CPU model, cores, OS, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def git_commit(root: str | Path) -> str:
    """HEAD's commit, with ``+dirty`` when tracked files differ from it; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def save_results(folder: str | Path, results: dict[str, Any], *, root: str | Path, command: str,
                 runtime_s: float, parameters: dict[str, Any]) -> Path:
    """Write ``results`` (plain data and DataFrames) to ``folder/results.json`` with when, where,
    from which commit and by which command it ran, and how long it took."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "commit": git_commit(root), "command": command, "runtime_s": round(runtime_s, 1),
            "parameters": _plain(parameters)}
    payload = {"meta": meta, **{k: _plain(v) for k, v in results.items()}}
    path = folder / "results.json"
    path.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    return path


def load_results(folder: str | Path) -> dict[str, Any]:
    """The committed full-mode results in ``folder`` (``results.json``); FileNotFoundError naming
    a missing file."""
    folder = require_files(folder, RESULTS_FILES)
    return json.loads((folder / "results.json").read_text())
