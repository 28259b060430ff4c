"""The serving lab (``notebooks/07_serving.ipynb``): decode on this machine against the serving model,
real-model shapes on Ascend and NVIDIA devices, expert offloading and EPLB on real routing traces.

What it measures and computes:

- ``measure_decode``: cached decode steps of a workbench model on this machine over batch size and
  KV-cache length (the workbench's cache attends over every slot, so the slot count is the context
  the step pays for), beside ``workbench.bench.serving.predict_decode`` on this machine's measured
  matmul and copy roofs (``decode_vs_model``), with the memory- and compute-bound regions;
- ``device_curves``: TPOT against tokens/s per device for the real shapes on each device, at the
  low / value / high ends of the device table's bands (the contested Ascend figures); the
  expert-parallel degree is the smallest power of two whose weights leave room for the KV cache;
- ``collect_traces``: routing traces of generation from the trained models of the generation lab
  (``workbench.labs.generation.train_models``, the same run cache), with next-layer prefetch
  guesses (``workbench.analysis.offload``); ``hf_models_on_disk`` looks for a Hugging Face MoE
  model in the local cache (nothing is downloaded);
- ``hit_rate_frame``: the expert cache's hit rate per policy, cache size and decode batch on the
  traces and on the random-routing baseline with the same loads; ``offload_cost``: what the misses
  cost in time per token over each device's host link, for Mixtral 8x7B (8 experts, top-2: the
  trained ``tiny`` models' routing shape);
- ``eplb_trace_table``: device load max / mean before (round-robin) and after EPLB placement on the
  traces' per-expert loads; ``eplb_decode``: the decode step with the slowest device setting the
  time, for a real shape whose per-expert load follows the Zipf law fitted to the traces.

Results mode reads ``notebooks/results/07_serving/results.json`` and the committed traces
(``traces.npz``); smoke and full mode recompute them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.analysis import eplb
from workbench.analysis import offload as off
from workbench.labs.modes import require_files
from workbench.validation import check

RESULTS_FILES = ("results.json", "traces.npz")

# The shapes and devices the notebook compares (keys of perfmodel.SHAPES and devices.yaml).
SERVING_SHAPES = ("deepseek-v3", "qwen3-235b-a22b", "qwen3-30b-a3b", "mixtral-8x7b", "telechat3-105b-a4.7b",
                  "gpt-oss-120b")
SERVING_DEVICES = ("Ascend910B", "Ascend910C", "H100", "H200", "H800")
OFFLOAD_SHAPE = "mixtral-8x7b"  # 8 experts, top-2: the routing shape of the trained tiny models


# --- decode on this machine ------------------------------------------------------------------------


def timing_model(base: Any, seq_len: int, seed: int = 0) -> Any:
    """An untrained model of ``base``'s shape with context ``seq_len``, in evaluation mode, for timing
    decode (a step's time does not depend on what the weights learned)."""
    from dataclasses import replace

    from workbench.model import MoELM

    torch.manual_seed(seed)
    return MoELM(replace(base, seq_len=seq_len)).eval()


def time_decode(model: Any, batch: int, context: int, *, steps: int = 8, warmup: int = 2,
                prompt_len: int = 4) -> float:
    """Median seconds of one cached decode step of ``batch`` sequences with a KV cache of ``context``
    slots (a ``prompt_len``-token prefill first; every step attends over all slots)."""
    from workbench.inference import KVCache

    check(prompt_len + warmup + steps <= context, "context", f"must hold the prompt, {warmup} warm-up and "
          f"{steps} timed steps", context)
    g = torch.Generator().manual_seed(0)
    cache = KVCache(model, batch, context)
    times = []
    with torch.inference_mode():
        out = model.forward_cached(torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g), cache)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            out = model.forward_cached(nxt, cache)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_decode(model: Any, batch_sizes: Sequence[int], contexts: Sequence[int], *, steps: int = 8,
                   warmup: int = 2, say=print) -> list[dict[str, Any]]:
    """One row per (batch, context): the measured median decode step and tokens/s (all sequences)."""
    rows = []
    t0 = time.perf_counter()
    for context in contexts:
        for batch in batch_sizes:
            step = time_decode(model, batch, context, steps=steps, warmup=warmup)
            rows.append({"batch": batch, "context": context, "step_ms": 1e3 * step, "tokens_per_s": batch / step})
    say(f"decode timed at {len(rows)} points in {time.perf_counter() - t0:.0f} s "
        f"({torch.get_num_threads()} thread(s))")
    return rows


def this_machine(matmul_size: int = 1024, copy_bytes: int = 128 << 20) -> tuple[Any, dict[str, float]]:
    """This machine's fp32 matmul and copy roofs, measured now (``workbench.bench.harness``)."""
    from workbench.bench.harness import this_machine as measure

    return measure("cpu", "float32", matmul_size=matmul_size, copy_bytes=copy_bytes)


def machine_device(peaks: dict[str, float]) -> Any:
    """The ``Device`` of measured ``peaks`` (as ``this_machine`` returns them, or read back)."""
    from workbench.bench.perfmodel import measured_device

    return measured_device(peaks["matmul_peak_flops"], peaks["copy_bandwidth_bytes_s"], name="this machine",
                           dtype="fp32")


def decode_vs_model(rows: list[dict[str, Any]], cfg: Any, peaks: dict[str, float]) -> Any:
    """The measured rows beside ``predict_decode`` for ``cfg``'s shape on this machine (fp32 weights and
    KV cache, uniform routing): predicted tokens/s, the bound, the ratio measured / predicted."""
    import pandas as pd

    from workbench.bench import perfmodel as pm
    from workbench.bench import serving

    shp = pm.shape_from_model_config(cfg, "workbench")
    dev = machine_device(peaks)
    out = []
    for r in rows:
        d = serving.predict_decode(shp, dev, batch=r["batch"], context=r["context"], precision="fp32",
                                   kv_precision="fp32")
        out.append({**r, "predicted_tokens_per_s": d.tokens_per_s, "predicted_step_ms": 1e3 * d.step_s,
                    "bound": d.bound, "memory_ms": 1e3 * d.memory_s, "compute_ms": 1e3 * d.compute_s,
                    "measured_over_predicted": r["tokens_per_s"] / d.tokens_per_s})
    return pd.DataFrame(out)


def plot_decode_measured(frame: Any, axes=None):
    """Tokens/s against batch size per context: measured (solid) and the model (dashed), the points the
    model calls compute-bound filled, memory-bound hollow."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 1, figsize=(7, 3.8))
    ax = axes
    for i, (context, rows) in enumerate(frame.groupby("context")):
        colour = f"C{i}"
        ax.plot(rows["batch"], rows["tokens_per_s"], "-", color=colour, label=f"measured, {context} slots")
        ax.plot(rows["batch"], rows["predicted_tokens_per_s"], "--", color=colour, lw=1, label="model")
        for _, r in rows.iterrows():
            filled = r["bound"] == "compute"
            ax.plot(r["batch"], r["tokens_per_s"], "o", color=colour, mfc=colour if filled else "white")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("decode on this machine (filled: the model says compute-bound; hollow: memory-bound)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return ax.figure


# --- real shapes on Ascend and NVIDIA devices ----------------------------------------------------------


def fitting_ep(shp: Any, dev: Any, *, context: float, precision: str, end: str = "value",
               min_batch: int = 8) -> int | None:
    """The smallest power-of-two expert-parallel degree (up to the expert count) at which ``min_batch``
    sequences of ``context`` fit beside the weights; None if none does."""
    from workbench.bench import serving

    ep = 1
    while ep <= max(shp.num_experts, 1):
        if serving.max_batch(shp, dev, context=context, precision=precision, ep=ep, end=end) >= min_batch:
            return ep
        ep *= 2
    return None


def device_curves(shapes: Sequence[str] = SERVING_SHAPES, devices: Sequence[str] = SERVING_DEVICES, *,
                  batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256), context: float = 4096,
                  precision: str = "bf16", ends: Sequence[str] = ("low", "value", "high")) -> list[dict[str, Any]]:
    """TPOT and tokens/s per device of each shape on each device over batch sizes (up to what fits),
    at each end of the device table's bands; the EP degree from ``fitting_ep`` at the band's value."""
    from workbench.bench import perfmodel as pm
    from workbench.bench import serving

    table = pm.load_devices()
    rows = []
    for name in shapes:
        shp = pm.shape(name)
        for key in devices:
            dev = table[key]
            ep = fitting_ep(shp, dev, context=context, precision=precision)
            if ep is None:
                continue
            for end in ends:
                for batch in batches:
                    d = serving.predict_decode(shp, dev, batch=batch, context=context, precision=precision, ep=ep,
                                               end=end)
                    if d.max_batch is not None and batch > d.max_batch:
                        break
                    rows.append({"shape": shp.name, "device": key, "end": end, "ep": ep, "batch": batch,
                                 "tpot_ms": 1e3 * d.tpot_s, "tokens_per_s": d.tokens_per_s, "bound": d.bound,
                                 "max_batch": d.max_batch, "a2a_ms": 1e3 * d.a2a_s})
    return rows


def plot_device_curves(frame: Any, shape_names: Sequence[str] | None = None, cols: int = 3):
    """TPOT against tokens/s per device, a panel per shape, a line per device at the band's value and a
    shaded band between its low and high ends."""
    import matplotlib.pyplot as plt

    names = list(shape_names or frame["shape"].unique())
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        sub = frame[frame["shape"] == name]
        for i, (key, rows) in enumerate(sub.groupby("device", sort=False)):
            mid = rows[rows["end"] == "value"]
            ax.plot(mid["tokens_per_s"], mid["tpot_ms"], "-o", ms=3, color=f"C{i}",
                    label=f"{key} (EP{int(mid['ep'].iloc[0]) if len(mid) else '?'})")
            lo, hi = rows[rows["end"] == "low"], rows[rows["end"] == "high"]
            if len(lo) and len(hi):
                ax.plot(lo["tokens_per_s"], lo["tpot_ms"], ":", color=f"C{i}", lw=0.8)
                ax.plot(hi["tokens_per_s"], hi["tpot_ms"], ":", color=f"C{i}", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("output tokens / s per device")
        ax.set_ylabel("TPOT (ms)")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.suptitle("decode: time per output token against throughput per device (dotted: the band's low and high "
                 "ends)", fontsize=10)
    return fig


def published_table(ends: Sequence[str] = ("low", "value", "high")) -> Any:
    """The serving model against the published figures (``serving.serving_errors``), one column of
    predicted tokens/s and error per band end."""
    import pandas as pd

    from workbench.bench import serving

    frames = []
    for end in ends:
        f = pd.DataFrame(serving.serving_errors(end=end))
        frames.append(f.set_index("key")[["predicted", "error"]].add_suffix(f"_{end}"))
    base = pd.DataFrame(serving.serving_errors(end="value")).set_index("key")
    cols = ["model", "device", "phase", "published", "bound"]
    return base[cols].join(frames)


def serving_panel(shape: str, batch: int, context: int, ep: int, precision: str,
                  devices: Sequence[str] = SERVING_DEVICES) -> Any:
    """One decode step of ``shape`` on each device: its parts' times (a bar per device) and a table of
    TPOT, tokens/s, bound and the batch that fits. What the notebook's widget draws."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from workbench.bench import perfmodel as pm
    from workbench.bench import serving

    shp, table = pm.shape(shape), pm.load_devices()
    rows, parts = [], {}
    for key in devices:
        d = serving.predict_decode(shp, table[key], batch=batch, context=context, precision=precision, ep=ep)
        fits = d.max_batch is None or d.max_batch >= batch
        rows.append({"device": key, "TPOT ms": 1e3 * d.tpot_s, "tokens/s per device": d.tokens_per_s,
                     "bound": d.bound, "max batch": d.max_batch, "fits": fits})
        parts[key] = {k: 1e3 * v for k, v in d.parts_s.items()}
    frame = pd.DataFrame(rows).set_index("device")
    fig, ax = plt.subplots(figsize=(8, 2.8))
    pd.DataFrame(parts).T.plot.barh(stacked=True, ax=ax, width=0.7)
    ax.set_xlabel("ms per decode step")
    ax.set_title(f"{shp.name}: batch {batch} per device, {context} tokens of context, EP{ep}, {precision} weights",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    return frame, fig


# --- traces ------------------------------------------------------------------------------------------


def _same_configs(info: dict[str, Any], model: dict[str, Any], train: dict[str, Any]) -> bool:
    from workbench.experiments import NOT_IN_KEY

    old = info.get("train_config", {})
    shared = [k for k in train if k in old and k not in NOT_IN_KEY]
    return info.get("model_config") == model and all(old[k] == train[k] for k in shared)


def trained_models(base: Any, train: Any, seeds: Sequence[int], cache_dir: str | Path, *, jobs: int = 2,
                   reuse_older_code: bool = True, say=print) -> tuple[dict[int, Any], dict[int, dict[str, Any]]]:
    """One trained model per seed, from the generation lab's run cache (``runs/cache/06_generation``).

    The cache key includes a hash of the training code, so any edit to it retrains. With
    ``reuse_older_code``, a finished run of the same model and training configs made by an earlier
    version of the training code is used when there is none for this version (its run directory is
    reported); otherwise ``generation.train_models`` trains the missing seeds."""
    from dataclasses import replace

    from workbench.labs import generation as gen
    from workbench.train.rundir import read_run_info

    runs: dict[int, dict[str, Any]] = {}
    missing = []
    for seed in seeds:
        exact = gen.run_dir_for(base, train, seed, cache_dir)
        if gen._finished(exact):
            runs[seed] = {"run_dir": str(exact), "cached": True, "wall_s": float("nan"), "code": "current"}
            continue
        found = None
        if reuse_older_code:
            model_cfg, train_cfg = base.to_dict(), replace(train, seed=seed).to_dict()
            candidates = []
            for run_dir in Path(cache_dir, "06_generation").glob(f"seed{seed}-*"):
                info = read_run_info(run_dir)
                if info and info.get("status") == "finished" and _same_configs(info, model_cfg, train_cfg):
                    candidates.append((str(info.get("updated", "")), run_dir))
            found = max(candidates)[1] if candidates else None
        if found is not None:
            runs[seed] = {"run_dir": str(found), "cached": True, "wall_s": float("nan"), "code": "earlier"}
            say(f"seed {seed}: the same configs trained by an earlier version of the training code ({found})")
        else:
            missing.append(seed)
    if missing:
        for seed, r in gen.train_models(base, train, missing, cache_dir, jobs=jobs, say=say).items():
            runs[seed] = {**r, "code": "current"}
    runs = {s: runs[s] for s in seeds}
    return gen.load_models(runs), runs


def collect_traces(models: dict[int, Any], data: Any, *, prompt_tokens: int = 32, new_tokens: int = 96,
                   per_domain: int = 8, temperature: float = 0.8, say=print) -> dict[int, off.ExpertTrace]:
    """A generation trace per seed's model: ``per_domain`` held-out prompts of each domain (their first
    ``prompt_tokens`` tokens; the domains interleaved), continued by ``new_tokens`` sampled tokens, with
    prefetch guesses."""
    from workbench.labs.generation import claim_prompts

    prompts, domains = claim_prompts(data, prompt_tokens, per_domain)
    # interleave the domains, so that a decode batch of consecutive sequences mixes requests as a server's
    # batch would (grouped by domain, a batch's tokens would share their experts more than requests do)
    order = sorted(range(len(prompts)), key=lambda i: (domains[:i].count(domains[i]), domains[i]))
    prompts = [prompts[i] for i in order]
    traces = {}
    t0 = time.perf_counter()
    for seed, model in models.items():
        traces[seed] = off.generation_trace(model, prompts, new_tokens, temperature=temperature, seed=seed,
                                            source=f"tiny, seed {seed}")
    say(f"{len(traces)} traces of {len(prompts)} sequences x {new_tokens} decode steps in "
        f"{time.perf_counter() - t0:.0f} s")
    return traces


def save_traces(folder: str | Path, traces: dict[int, off.ExpertTrace]) -> Path:
    """All seeds' traces in one ``traces.npz`` (arrays named ``seed<s>/<name>``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"seed{s}/{k}": v for s, t in traces.items() for k, v in t.to_arrays().items()}
    path = folder / "traces.npz"
    np.savez_compressed(path, **arrays)
    return path


def load_traces(folder: str | Path) -> dict[int, off.ExpertTrace]:
    with np.load(Path(folder) / "traces.npz") as f:
        seeds = sorted({int(k.split("/")[0][4:]) for k in f.files})
        return {s: off.ExpertTrace.from_arrays({k.split("/", 1)[1]: f[k] for k in f.files
                                                 if k.startswith(f"seed{s}/")}) for s in seeds}


def hf_models_on_disk(roots: Sequence[str | Path] | None = None) -> list[Path]:
    """Folders under the Hugging Face caches (``HF_HOME``, ``~/.cache/huggingface``) holding a
    ``config.json`` of an MoE family the interop supports; nothing is downloaded."""
    import os

    from workbench.interop.hf import HF_FAMILIES

    if roots is None:
        roots = [os.environ.get("HF_HOME", ""), Path.home() / ".cache" / "huggingface"]
    found = []
    for root in roots:
        root = Path(root) if root else None
        if root is None or not root.is_dir():
            continue
        for config in root.rglob("config.json"):
            try:
                if json.loads(config.read_text()).get("model_type") in HF_FAMILIES:
                    found.append(config.parent)
            except (OSError, ValueError):
                continue
    return sorted(set(found))


# --- offloading -------------------------------------------------------------------------------------


ROUTINGS = ("generated", "random (same load)")


def hit_rate_frame(traces: dict[int, off.ExpertTrace], capacities: Sequence[int], *,
                   batches: Sequence[int] = (1, 4), prefetch: Sequence[str] = off.PREFETCH_SOURCES,
                   say=print) -> Any:
    """``offload.hit_rate_table`` on every seed's trace (``routing`` = generated) and on its shuffled
    copy with the same loads (``random (same load)``, without prefetch)."""
    import pandas as pd

    t0 = time.perf_counter()
    rows = []
    for seed, trace in traces.items():
        for routing, t, pf in ((ROUTINGS[0], trace, prefetch), (ROUTINGS[1], off.shuffled_trace(trace, seed), ())):
            for r in off.hit_rate_table(t, capacities, batches=batches, prefetch=pf):
                rows.append({"seed": seed, "routing": routing, **r})
    say(f"cache simulated over {len(rows)} (seed, routing, layer, batch, policy, size) cases in "
        f"{time.perf_counter() - t0:.0f} s")
    return pd.DataFrame(rows)


def hit_rate_summary(frame: Any) -> Any:
    """Mean over MoE layers per seed, then mean and std over seeds, per (routing, batch, policy,
    capacity): hit rate, copies per step and layer (``loads``), demand copies (stalls) per step."""
    per_seed = frame.assign(loads_per_step=frame["loads"] / frame["steps"],
                            demand_per_step=frame["demand_loads"] / frame["steps"])
    keys = ["routing", "batch", "policy", "capacity"]
    per_seed = per_seed.groupby(["seed", *keys], as_index=False)[
        ["hit_rate", "loads_per_step", "demand_per_step", "distinct_per_step"]].mean()
    out = per_seed.groupby(keys).agg(hit_rate=("hit_rate", "mean"), hit_rate_std=("hit_rate", "std"),
                                     loads_per_step=("loads_per_step", "mean"),
                                     demand_per_step=("demand_per_step", "mean"),
                                     distinct_per_step=("distinct_per_step", "mean"), seeds=("seed", "nunique"))
    return out.reset_index()


def prefetch_frame(traces: dict[int, off.ExpertTrace]) -> Any:
    """Per seed, source and MoE layer (after the first): the share of a token's experts its guess named,
    beside a random guess's k / E."""
    import pandas as pd

    rows = []
    for seed, t in traces.items():
        for source in t.prefetch:
            recall = off.prefetch_recall(t, source)
            for layer in range(1, t.num_layers):
                rows.append({"seed": seed, "source": source, "layer": layer, "recall": float(recall[layer]),
                             "random_guess": t.top_k / t.num_experts})
    return pd.DataFrame(rows)


def distinct_table(summary: Any, traces: dict[int, off.ExpertTrace]) -> Any:
    """Per decode batch: the distinct experts a step needs per layer on the generated traces and on the
    random baseline (mean over layers and seeds), beside ``serving.expected_distinct_experts`` with each
    layer's trace load (mean over layers and seeds) and with uniform routing."""
    import pandas as pd

    from workbench.bench import serving

    one = summary[(summary["policy"] == "lru") & (summary["capacity"] == summary["capacity"].max())]
    rows = []
    for batch in sorted(one["batch"].unique()):
        got = {r: float(one[(one["batch"] == batch) & (one["routing"] == r)]["distinct_per_step"].iloc[0])
               for r in ROUTINGS}
        expected = np.mean([serving.expected_distinct_experts(t.num_experts, t.top_k, batch, load.tolist())
                            for t in traces.values() for load in t.loads()])
        t = next(iter(traces.values()))
        rows.append({"batch": int(batch), "generated": got[ROUTINGS[0]], "random (same load)": got[ROUTINGS[1]],
                     "expected (trace load)": float(expected),
                     "expected (uniform)": serving.expected_distinct_experts(t.num_experts, t.top_k, batch)})
    return pd.DataFrame(rows).set_index("batch")


def plot_hit_rates(summary: Any, batch: int, policies: Sequence[str] | None = None, ax=None):
    """Hit rate against cache size (experts per layer) at decode batch ``batch``: a line per policy on
    the generated traces (± std over seeds), the same policies dotted on the random-routing baseline."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.8))
    sub = summary[summary["batch"] == batch]
    names = list(policies or sub["policy"].unique())
    for i, policy in enumerate(names):
        for routing, style in zip(ROUTINGS, ("-o", ":"), strict=True):
            rows = sub[(sub["policy"] == policy) & (sub["routing"] == routing)]
            if not len(rows):
                continue
            label = policy if routing == ROUTINGS[0] else None
            ax.plot(rows["capacity"], rows["hit_rate"], style, ms=3, color=f"C{i}", label=label)
            if routing == ROUTINGS[0]:
                ax.fill_between(rows["capacity"], rows["hit_rate"] - rows["hit_rate_std"].fillna(0),
                                rows["hit_rate"] + rows["hit_rate_std"].fillna(0), color=f"C{i}", alpha=0.15)
    ax.set_xlabel("cache size (experts per layer on the device)")
    ax.set_ylabel("hit rate")
    ax.set_title(f"expert cache at decode batch {batch} (dotted: random routing, same load)", fontsize=10)
    ax.legend(fontsize=7)
    return ax.figure


def offload_cost(summary: Any, *, shape: str = OFFLOAD_SHAPE, devices: Sequence[str] = SERVING_DEVICES,
                 precision: str = "bf16", batch: int = 1, policies: Sequence[str] = ("lru", "belady"),
                 prefetch_policy: str | None = "lru+gate_input", context: float = 1024) -> Any:
    """Time per output token (TPOT) of ``shape`` with a cache of N experts per layer on each device: the
    generated traces' copies per step and layer (at decode ``batch``) x the shape's MoE layers x its
    expert bytes / the device's host link, added to the decode step with every expert on the device
    (``predict_decode``, which ignores that they would not fit). With prefetch, the guessed copies
    overlap the step and only the stalls (demand copies) add to it, unless the link is busier than
    the step: per token max(step + stall time, all copies' time)."""
    import pandas as pd

    from workbench.bench import perfmodel as pm
    from workbench.bench import serving

    shp, table = pm.shape(shape), pm.load_devices()
    nbytes = off.expert_bytes(shp.d_model, shp.expert_hidden, precision)
    sub = summary[(summary["routing"] == ROUTINGS[0]) & (summary["batch"] == batch)]
    rows = []
    for key in devices:
        link = off.host_link(key)
        resident = serving.predict_decode(shp, table[key], batch=batch, context=context, precision=precision)
        for policy in [*policies, *([prefetch_policy] if prefetch_policy else [])]:
            for _, r in sub[sub["policy"] == policy].iterrows():
                # copies of one decode step: every sequence of the batch waits for them
                all_s = off.time_per_token(r["loads_per_step"], shp.n_moe_layers, nbytes, link)
                stall_s = off.time_per_token(r["demand_per_step"], shp.n_moe_layers, nbytes, link)
                if "+" in policy:
                    total = max(resident.tpot_s + stall_s, all_s)
                else:
                    total = resident.tpot_s + all_s
                rows.append({"device": key, "host_link_gb_s": link, "policy": policy, "capacity": r["capacity"],
                             "hit_rate": r["hit_rate"], "copy_ms_per_step": 1e3 * all_s,
                             "stall_ms_per_step": 1e3 * stall_s, "resident_tpot_ms": 1e3 * resident.tpot_s,
                             "tpot_ms": 1e3 * total})
    return pd.DataFrame(rows)


# --- EPLB ----------------------------------------------------------------------------------------------


def eplb_trace_table(traces: dict[int, off.ExpertTrace], devices: Sequence[int] = (2, 4, 8),
                     redundant: Sequence[int] = (0, 2, 4, 8)) -> Any:
    """Per seed, ``eplb.balance_table`` on the trace's per-expert decode loads of every MoE layer."""
    import pandas as pd

    rows = []
    for seed, t in traces.items():
        for r in eplb.balance_table(t.loads(), devices, redundant):
            rows.append({"seed": seed, **r})
    return pd.DataFrame(rows)


def zipf_exponents(traces: dict[int, off.ExpertTrace]) -> Any:
    """The Zipf exponent (``serving.zipf_fit``) of each seed's and MoE layer's decode load."""
    import pandas as pd

    from workbench.bench import serving

    return pd.DataFrame([{"seed": s, "layer": layer, "exponent": serving.zipf_fit(load.tolist())}
                         for s, t in traces.items() for layer, load in enumerate(t.loads())])


def _balanced_parts(shp: Any, dev: Any, settings: dict[str, Any], redundant: int, end: str) -> dict[str, float]:
    """One MoE layer's balanced expert compute, expert weight reads and exposed all-to-all, and the rest
    of the step, from ``serving.predict_decode`` with ``settings``."""
    from workbench.bench import serving

    d = serving.predict_decode(shp, dev, **settings, redundant_experts=redundant, end=end)
    n_moe, precision = shp.n_moe_layers, settings.get("precision", "bf16")
    F = serving.compute_roof(dev, serving.compute_dtype(precision, dev), end)
    expert = 3 * shp.d_model * shp.expert_hidden
    T = settings["batch"] * (1 + settings.get("mtp_tokens", 0))
    bandwidth = dev.get("hbm_tb_s", end) * 1e12
    return {"compute": 2.0 * T * shp.top_k * expert / F,
            "weights": d.experts_touched * expert * serving.PRECISION_BYTES[precision] / bandwidth,
            "a2a": d.parts_s.get("all_to_all", 0.0) / n_moe,
            "rest": d.step_s - d.parts_s.get("experts", 0.0) - d.parts_s.get("all_to_all", 0.0),
            "step": d.step_s, "per_step": settings["batch"] * d.tokens_per_step,
            "expert_share": (d.parts_s.get("experts", 0.0) + d.parts_s.get("all_to_all", 0.0)) / d.step_s}


def _step_with_placements(parts: dict[str, float], placements: list[eplb.Placement]) -> float:
    # each MoE layer waits for its slowest device: m x the balanced expert FLOPs on the roofline
    # against the same weight reads, and m x the balanced all-to-all
    layer_s = 0.0
    for p in placements:
        m = np.asarray(p.device_loads) / p.mean_load
        layer_s += float(np.max(np.maximum(m * parts["compute"], parts["weights"]) + m * parts["a2a"]))
    return parts["rest"] + layer_s


def eplb_decode(figure: str, *, exponent: float, redundant: int | None = None, seed: int = 0,
                end: str = "value") -> dict[str, Any]:
    """The decode step of a published decode figure's setting (a key of ``serving_published.yaml``:
    shape, device, batch, context, EP degree, precision, overlap, ...) when the slowest device sets
    its time: before EPLB (round-robin, no replicas) and after (``redundant`` replicas; default the
    figure's own, or 32 where it has none), each MoE layer's per-expert load following Zipf's law
    with ``exponent`` in a random expert order (one per layer, the same before and after).

    A device whose experts receive m times the mean assignments computes m times the balanced expert
    FLOPs (on the roofline, against the same weight reads: its expert slots) and exchanges m times
    the balanced (exposed) all-to-all; the rest of the step is ``serving.predict_decode``'s for the
    figure. ``balanced``: the serving model's own step (every device at the mean)."""
    from workbench.bench import perfmodel as pm
    from workbench.bench import serving

    p = {q.key: q for q in serving.load_published()}
    check(figure in p and p[figure].phase == "decode", "figure", "must be a decode figure of serving_published.yaml: "
          + ", ".join(k for k, q in p.items() if q.phase == "decode"), figure)
    q = p[figure]
    shp, dev = pm.shape(q.model), pm.load_devices()[q.device]
    R = (q.redundant_experts or 32) if redundant is None else redundant
    settings = {"batch": q.batch, "context": q.context, "precision": q.precision, "ep": q.ep,
                "kv_precision": q.kv_precision, "overlap": q.overlap, "dispatch_dtype": q.dispatch_dtype,
                "combine_dtype": q.combine_dtype, "mtp_tokens": q.mtp_tokens, "mtp_acceptance": q.mtp_acceptance,
                "node_size": q.scale_up_domain}
    before_parts = _balanced_parts(shp, dev, settings, 0, end)
    after_parts = _balanced_parts(shp, dev, settings, R, end)
    zipf = np.asarray(serving.zipf_load(shp.num_experts, exponent))
    orders = np.random.default_rng(seed)
    loads = [zipf[orders.permutation(shp.num_experts)] for _ in range(shp.n_moe_layers)]
    before = [eplb.round_robin(load, q.ep) for load in loads]
    after = [eplb.place(load, q.ep, R) for load in loads]
    step_before = _step_with_placements(before_parts, before)
    step_after = _step_with_placements(after_parts, after)
    imb_before = eplb.layers_imbalance(before)
    return {"figure": figure, "shape": shp.name, "device": q.device, "batch": q.batch, "context": q.context,
            "ep": q.ep, "redundant": R, "exponent": exponent, "max_over_mean_before": imb_before,
            "max_over_mean_after": eplb.layers_imbalance(after),
            "balanced_step_ms": 1e3 * before_parts["step"], "step_ms_before": 1e3 * step_before,
            "step_ms_after": 1e3 * step_after,
            "tokens_per_s_balanced": before_parts["per_step"] / before_parts["step"],
            "tokens_per_s_before": before_parts["per_step"] / step_before,
            "tokens_per_s_after": after_parts["per_step"] / step_after, "speedup": step_before / step_after,
            "simple_factor_before": eplb.step_time_factor(imb_before, before_parts["expert_share"])}


def eplb_decode_table(figures: Sequence[str], exponents: Sequence[float], *, seed: int = 0) -> Any:
    """``eplb_decode`` for every figure and Zipf exponent."""
    import pandas as pd

    return pd.DataFrame([eplb_decode(f, exponent=s, seed=seed) for f in figures for s in exponents])


# --- what the numbers say ------------------------------------------------------------------------------


def _rate(summary: Any, routing: str, batch: int, policy: str, capacity: int) -> float:
    rows = summary[(summary["routing"] == routing) & (summary["batch"] == batch) & (summary["policy"] == policy)
                   & (summary["capacity"] == capacity)]
    return float(rows["hit_rate"].iloc[0]) if len(rows) else math.nan


def offload_takeaways(summary: Any, prefetch: Any, num_experts: int, batch: int = 1) -> list[str]:
    """Sentences computed from the hit-rate summary and the prefetch recall (decode ``batch``)."""
    gen, rnd = ROUTINGS
    sub = summary[(summary["routing"] == gen) & (summary["batch"] == batch)]
    caps = sorted(c for c in sub["capacity"].unique() if c < num_experts)
    lines = []
    if not caps:
        return ["no cache smaller than the expert count was simulated"]
    belady_best = all(_rate(summary, r, b, "belady", c) >= max(_rate(summary, r, b, "lru", c),
                                                               _rate(summary, r, b, "lfu", c)) - 1e-12
                      for r in ROUTINGS for b in summary["batch"].unique() for c in summary["capacity"].unique())
    lines.append(f"Belady (offline optimum) at least as good as LRU and LFU at every cache size, batch and "
                 f"routing: {belady_best}.")
    for c in caps:
        lines.append(f"batch {batch}, cache of {c} of {num_experts} experts per layer: hit rate LRU "
                     f"{_rate(summary, gen, batch, 'lru', c):.1%}, LFU {_rate(summary, gen, batch, 'lfu', c):.1%}, "
                     f"Belady {_rate(summary, gen, batch, 'belady', c):.1%} on the generated traces; LRU "
                     f"{_rate(summary, rnd, batch, 'lru', c):.1%} and Belady "
                     f"{_rate(summary, rnd, batch, 'belady', c):.1%} under random routing with the same loads.")
    mid = caps[len(caps) // 2]
    per_batch = ", ".join(f"batch {b}: {_rate(summary, gen, b, 'lru', mid):.1%}"
                          for b in sorted(summary["batch"].unique()))
    lines.append(f"LRU with a cache of {mid} by decode batch (a step of more sequences needs more experts): "
                 f"{per_batch}.")
    above = [c for c in caps if _rate(summary, gen, batch, "lru", c) > _rate(summary, rnd, batch, "lru", c)]
    lines.append(f"LRU hits more on the generated traces than under random routing with the same loads at "
                 f"{len(above)} of {len(caps)} cache sizes below {num_experts} (batch {batch}): the gain is the "
                 "routing's order in time (temporal locality), since the loads are equal.")
    if len(prefetch):
        mean = prefetch.groupby("source")["recall"].mean()
        chance = float(prefetch["random_guess"].iloc[0])
        parts = ", ".join(f"{src} {mean[src]:.1%}" for src in mean.index)
        lines.append(f"prefetch: the next MoE layer's router applied to this layer's state names, on average over "
                     f"layers and seeds, {parts} of the next layer's experts (a random guess: {chance:.0%}).")
        for c in caps[:3]:
            name = "lru+gate_input"
            if name in set(sub["policy"]):
                lines.append(f"with that guess prefetched (LRU + gate input) a cache of {c} hits "
                             f"{_rate(summary, gen, batch, name, c):.1%} against LRU's "
                             f"{_rate(summary, gen, batch, 'lru', c):.1%} (all layers; the first has no guess).")
    return lines


def eplb_takeaways(trace_table: Any, decode_table: Any) -> list[str]:
    """Sentences computed from the EPLB tables."""
    lines = []
    mean = trace_table.groupby(["devices", "redundant"])[["before", "after"]].mean()
    for (G, R), r in mean.iterrows():
        if R in (0, max(trace_table["redundant"])):
            lines.append(f"trace loads on {G} devices, {R} redundant replicas: max / mean device load "
                         f"{r['before']:.3f} round-robin -> {r['after']:.3f} EPLB (mean over seeds; summed over "
                         "MoE layers).")
    for _, r in decode_table.iterrows():
        lines.append(f"{r['figure']} ({r['shape']} on {r['device']}, EP{r['ep']}, batch {r['batch']}), Zipf exponent "
                     f"{r['exponent']:.2f}: max / mean {r['max_over_mean_before']:.2f} -> "
                     f"{r['max_over_mean_after']:.2f} with {r['redundant']} replicas; "
                     f"{r['tokens_per_s_before']:,.0f} -> "
                     f"{r['tokens_per_s_after']:,.0f} tokens/s per device ({r['speedup']:.2f}x; balanced "
                     f"{r['tokens_per_s_balanced']:,.0f}).")
    return lines


# --- results ------------------------------------------------------------------------------------------


def save_results(folder: str | Path, results: dict[str, Any], traces: dict[int, off.ExpertTrace], *,
                 root: str | Path, command: str, runtime_s: float, parameters: dict[str, Any]) -> Path:
    """``results.json`` (with date, machine, commit, command, runtime) and ``traces.npz`` in ``folder``."""
    from workbench.labs.generation import save_results as save_json

    save_traces(folder, traces)
    return save_json(folder, results, root=root, command=command, runtime_s=runtime_s, parameters=parameters)


def load_results(folder: str | Path) -> tuple[dict[str, Any], dict[int, off.ExpertTrace]]:
    """The committed results and traces in ``folder``; FileNotFoundError naming a missing file."""
    folder = require_files(folder, RESULTS_FILES)
    return json.loads((folder / "results.json").read_text()), load_traces(folder)
