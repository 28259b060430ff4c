"""The expert-specialization lab (``notebooks/03_expert_specialization.ipynb``): what it trains,
what it measures, and how it judges two published claims.

What it trains (``lab_experiments``), all on the built-in corpus with the same budget:

- ``granularity``: the base model's experts (``coarse``), the same expert parameters cut into
  ``split`` times as many experts ``split`` times narrower with ``split`` times the top-k
  (``fine``), and the same with one of them made a shared expert that every token uses
  (``fine + shared``): DeepSeekMoE's fine-grained expert segmentation and shared-expert isolation
  (Dai et al. 2024, arXiv:2401.06066, section 3), at equal active and total expert parameters;
- ``router``: DeepSeek-V3's sigmoid router with auxiliary-loss-free balancing, beside the softmax
  top-k router with the Switch auxiliary loss of ``coarse``;
- ``accumulation``: the auxiliary loss counted per micro-batch or over the global batch under
  gradient accumulation (Qiu et al. 2025, arXiv:2501.11873), from the load-balancing lab.

What it measures (``specialization_frame``): every analysis of ``workbench.analysis.specialization``
on each run's routing of the validation set after training, per MoE layer, each beside its
random-routing baseline with the same load, and router saturation over training.

How it judges (``claim_check``): a claim "A specialises more than B" holds on a metric when A's
mean excess over its baseline is higher by more than ``NOISE_SE`` standard errors of the
difference, paired over seeds (``workbench.labs.balancing._difference``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from workbench.config import ModelConfig
from workbench.experiments import Experiment, Results
from workbench.labs.balancing import NOISE_SE, _difference, _moe, _stats, accumulation_experiments
from workbench.labs.modes import require_files
from workbench.train.config import TrainConfig
from workbench.validation import check

# The metrics the claims are judged on: domain specialization (NMI between domain and expert) and
# OLMoE's vocabulary specialization, each as the share of the way from random routing with the
# same load (0) to complete specialization (1), so models with different E and k compare.
CLAIM_METRICS = ("domain_nmi", "vocab")
METRIC_LABELS = {
    "domain_nmi": "domain specialization (NMI)",
    "vocab": "vocabulary specialization",
    "vocab_top1": "vocabulary specialization, first expert",
    "coactivation": "co-activation P(b|a), strongest pair",
    "cross_layer": "cross-layer consistency (NMI)",
}


def _fine_grained(base: ModelConfig, split: int, shared: int) -> dict[str, Any]:
    """MoE fields of DeepSeekMoE's segmentation of ``base``'s experts: ``split`` x as many experts,
    each ``split`` x narrower, ``split`` x the top-k; ``shared`` of them isolated as shared experts
    (taken from both the routed experts and the top-k, so active and total parameters stay)."""
    moe = base.moe
    check(moe is not None, "base", "must be an MoE model (its moe config is None)", moe)
    check(isinstance(split, int) and split >= 1 and moe.expert_hidden % split == 0, "split",
          f"must be an integer >= 1 that divides expert_hidden={moe.expert_hidden}", split)
    check(isinstance(shared, int) and 0 <= shared < moe.top_k * split, "shared",
          f"must be an integer in [0, top_k x split = {moe.top_k * split})", shared)
    hidden = moe.expert_hidden // split
    return {"num_experts": moe.num_experts * split - shared, "top_k": moe.top_k * split - shared,
            "expert_hidden": hidden, "num_shared_experts": shared,
            "shared_expert_hidden": hidden * shared if shared else None}


def granularity_experiments(base: ModelConfig, train: TrainConfig, *, split: int = 4,
                            seeds: tuple[int, ...] | None = None) -> list[Experiment]:
    """``coarse`` (the base), ``fine`` and ``fine + shared`` (one shared expert), all with the base's
    balancing; the names give experts x top-k."""
    moe = base.moe
    check(moe is not None, "base", "must be an MoE model (its moe config is None)", moe)
    runs = [Experiment(name=f"coarse {moe.num_experts} x top-{moe.top_k}", model=base, train=train,
                       tags={"group": "granularity", "granularity": 1, "shared_experts": 0}, seeds=seeds)]
    for shared in (0, 1):
        f = _fine_grained(base, split, shared)
        name = f"fine {f['num_experts']} x top-{f['top_k']}" + (f" + {shared} shared" if shared else "")
        runs.append(Experiment(name=name, model=base.replace(moe=replace(moe, **f)), train=train,
                               tags={"group": "granularity", "granularity": split, "shared_experts": shared},
                               seeds=seeds))
    return runs


def router_experiments(base: ModelConfig, train: TrainConfig, *, bias_update_rate: float = 1e-3,
                       seeds: tuple[int, ...] | None = None) -> list[Experiment]:
    """DeepSeek-V3's routing on the base's experts: sigmoid scores, normalised top-k gates and the
    auxiliary-loss-free bias (Wang et al. 2024, rate ``bias_update_rate``), no auxiliary loss."""
    model = _moe(base, router="sigmoid", bias_update_rate=bias_update_rate)
    return [Experiment(name=f"sigmoid loss-free {bias_update_rate:g}", model=model, train=train,
                       tags={"group": "router"}, seeds=seeds)]


def lab_experiments(base: ModelConfig, train: TrainConfig, *, split: int = 4, micro_batch: int = 2,
                    claim_seeds: tuple[int, ...] | None = None,
                    other_seeds: tuple[int, ...] | None = None) -> list[Experiment]:
    """Every run of the lab: granularity and accumulation (the two claims, at ``claim_seeds``) and
    the sigmoid router (at ``other_seeds``); None: the sweep's seeds."""
    aux = base.moe.aux_loss_weight if base.moe is not None else 0.0
    accumulation = [replace(e, tags={**e.tags}, seeds=claim_seeds)
                    for e in accumulation_experiments(base, train, micro_batch=micro_batch, aux_loss_weight=aux)]
    return [*granularity_experiments(base, train, split=split, seeds=claim_seeds),
            *router_experiments(base, train, seeds=other_seeds), *accumulation]


# --- what the runs learned -----------------------------------------------------------------------


def normalized_excess(score: float, baseline: float) -> float:
    """(score - baseline) / (1 - baseline): the share of the way from random routing with the same
    load (0) to complete specialization (1). Scores bounded by 1 only (NMI, shares)."""
    if any(isinstance(v, float) and math.isnan(v) for v in (score, baseline)) or baseline >= 1:
        return float("nan")
    return (score - baseline) / (1 - baseline)


def specialization_frame(results: Results, *, draws: int = 16, seed: int = 0) -> Any:
    """Every specialization analysis of every traced run, one row per (run, seed, MoE layer).

    Columns: name, seed, the experiment's tags, layer, then each metric of
    ``workbench.analysis.specialization.specialization_table`` with its ``_baseline``, and
    ``<metric>/norm`` (``normalized_excess``) for the metrics in ``METRIC_LABELS``. Vocabulary
    specialization is per byte class as well (``vocab/<class>``). ``draws``: simulations of the
    vocabulary baseline (fewer: faster, noisier)."""
    import pandas as pd

    from workbench.analysis.specialization import specialization_table
    from workbench.analysis.traces import byte_classes

    rows = []
    runs = results.runs.set_index(["name", "seed"])
    tag_columns = _tag_columns(results)
    classes = byte_classes()
    for (name, seed), detail in results.details.items():
        if not detail.get("traces"):
            continue
        counts = results.routing_counts(name, seed)
        ident = {"name": name, "seed": seed, **{c: runs.loc[(name, seed), c] for c in tag_columns}}
        for row in specialization_table(counts, classes=classes if counts.vocab_size == 256 else None,
                                        draws=draws, seed=seed):
            for metric in METRIC_LABELS:
                row[f"{metric}/norm"] = normalized_excess(row[metric], row[f"{metric}_baseline"])
            rows.append({**ident, **row})
    check(len(rows) > 0, "results", "must hold traced runs: run_experiments(..., traces=True)", len(results.details))
    return pd.DataFrame(rows)


def _tag_columns(results: Results) -> list[str]:
    """The experiments' tags: the runs table puts them after name and seed, before its first metric."""
    fixed = {"name", "seed"}
    first_metric = list(results.runs.columns).index("steps") if "steps" in results.runs.columns else None
    return [c for c in list(results.runs.columns)[:first_metric] if c not in fixed]


def run_scores(frame: Any) -> Any:
    """One row per (run, seed): every numeric column averaged over the MoE layers (cross-layer
    columns over the layers that have a next one)."""
    numeric = [c for c in frame.columns if c not in ("name", "seed", "layer") and frame[c].dtype.kind in "fi"]
    return frame.groupby(["name", "seed"], sort=False)[numeric].mean().reset_index()


def compare(scores: Any, a: str, b: str, metric: str) -> dict[str, Any]:
    """Whether run ``a`` scores higher than ``b`` on ``metric`` beyond seed noise: the mean
    difference, its standard error (paired over seeds when both have the same seeds), the
    difference in standard errors, and ``holds`` (``diff > NOISE_SE x SE``; None with one seed)."""
    diff, se, paired = _difference(scores, a, b, metric)
    out = {"a": a, "b": b, "metric": metric, "diff": diff, "se": se, "paired": paired,
           "z": diff / se if se and not math.isnan(se) else float("nan")}
    for key, name in (("a", a), ("b", b)):
        out[f"{key}_mean"], out[f"{key}_std"], out[f"{key}_seeds"] = _stats(scores, name, metric)
    out["holds"] = None if math.isnan(se) else bool(diff > NOISE_SE * se)
    return out


def _verdict(c: dict[str, Any], label: str) -> str:
    spread = f" ± {c['a_std']:.3f}" if c["a_std"] == c["a_std"] else ""
    spread_b = f" ± {c['b_std']:.3f}" if c["b_std"] == c["b_std"] else ""
    head = f"{label}: {c['a_mean']:.3f}{spread} ({c['a']}) vs {c['b_mean']:.3f}{spread_b} ({c['b']})"
    if c["holds"] is None:
        return head + ", too few seeds to judge against seed noise"
    z = f"{c['diff']:+.3f} = {c['z']:+.1f} {'paired ' if c['paired'] else ''}standard errors"
    return head + f", a difference of {z}: " + ("higher beyond seed noise" if c["holds"] else
                                               f"not higher beyond seed noise (threshold +{NOISE_SE:g} SE)")


def claim_check(scores: Any, a: str, b: str, claim: str,
                metrics: tuple[str, ...] = CLAIM_METRICS) -> dict[str, Any]:
    """The claim "``a`` specialises more than ``b``" on each of ``metrics`` (their ``/norm``
    columns in ``scores``, from ``run_scores``). ``outcome``: "reproduces" when it holds on every
    metric, "reproduces on <metrics> only" when on some, "the opposite holds" when ``b`` is higher
    beyond seed noise on one and ``a`` on none, and otherwise "does not reproduce beyond seed noise"."""
    tests = {m: compare(scores, a, b, f"{m}/norm") for m in metrics}
    reverse = {m: compare(scores, b, a, f"{m}/norm")["holds"] for m in metrics}
    held = [m for m, t in tests.items() if t["holds"]]
    if any(t["holds"] is None for t in tests.values()):
        outcome = "cannot be judged: too few seeds"
    elif len(held) == len(metrics):
        outcome = "reproduces"
    elif held:
        outcome = f"reproduces on {' and '.join(METRIC_LABELS[m] for m in held)} only"
    elif any(reverse.values()):
        outcome = "does not reproduce: the opposite holds on " + " and ".join(
            METRIC_LABELS[m] for m, r in reverse.items() if r)
    else:
        outcome = "does not reproduce beyond seed noise"
    lines = [_verdict(t, METRIC_LABELS[m] + " (normalised excess)") for m, t in tests.items()]
    return {"claim": claim, "a": a, "b": b, "tests": tests, "outcome": outcome,
            "verdict": f"{claim}: {outcome}. " + "; ".join(lines) + "."}


def beats_random(frame: Any, name: str, metrics: tuple[str, ...] = CLAIM_METRICS) -> dict[str, dict[str, float]]:
    """How far one experiment's scores are above random routing with the same load: per metric, the
    mean excess (score - baseline) over seeds and layers, its smallest value over (seed, layer), the
    mean score and baseline, and the number of (seed, layer) rows."""
    rows = frame[frame["name"] == name]
    check(len(rows) > 0, "name", f"must be a traced run among {sorted(frame['name'].unique())}", name)
    out = {}
    for m in metrics:
        excess = rows[m] - rows[f"{m}_baseline"]
        out[m] = {"excess_mean": float(excess.mean()), "excess_min": float(excess.min()),
                  "score": float(rows[m].mean()), "baseline": float(rows[f"{m}_baseline"].mean()), "n": len(rows)}
    return out


def saturation_summary(saturation: Any, fraction: float = 0.1) -> Any:
    """Per run name: router saturation (top-k overlap with the final routing, mean over MoE layers
    and seeds) at the first validation at or after ``fraction`` of training, and its baseline."""
    last = saturation.groupby(["name", "seed"])["step"].transform("max")
    early = saturation[saturation["step"] >= fraction * last]
    first = early.groupby(["name", "seed"])["step"].transform("min")
    at = early[early["step"] == first]
    table = at.groupby("name", sort=False)[["step", "saturation", "baseline", "top1", "top1_baseline"]].mean()
    return table


def takeaways(frame: Any, saturation: Any | None = None, *, coarse: str, fine_shared: str, fine: str | None = None,
              micro: str | None = None, global_: str | None = None, untrained: Any | None = None,
              runs: Any | None = None) -> list[str]:
    """The lab's conclusions as sentences, each computed from the frames. ``untrained``: the
    ``specialization_table`` rows of ``coarse``'s config at initialisation on the same data;
    ``runs``: the runner's runs table (validation losses)."""
    lines = []
    base = beats_random(frame, coarse)
    d, v = base["domain_nmi"], base["vocab"]
    lines.append(f"{coarse} after training: domain NMI {d['score']:.3f} vs {d['baseline']:.4f} for random routing "
                 f"with the same load (excess {d['excess_mean']:+.3f}, smallest over seeds and layers "
                 f"{d['excess_min']:+.3f}); vocabulary specialization {v['score']:.3f} vs {v['baseline']:.3f} "
                 f"(excess {v['excess_mean']:+.3f}, smallest {v['excess_min']:+.3f}).")
    if untrained is not None and len(untrained):
        u_dom, u_voc = float(untrained["domain_nmi"].mean()), float(untrained["vocab"].mean())
        u_base = float(untrained["vocab_baseline"].mean())
        reads_token = u_voc - u_base >= 0.5 * v["excess_mean"]  # the untrained router has most of the excess
        lines.append(f"The same config untrained: domain NMI {u_dom:.3f} and vocabulary specialization {u_voc:.3f} "
                     f"(random {u_base:.3f}). Training {'raised' if d['score'] > u_dom else 'lowered'} domain "
                     f"specialization to {d['score']:.3f} and {'raised' if v['score'] > u_voc else 'lowered'} "
                     f"vocabulary specialization to {v['score']:.3f}"
                     + (": above the random baseline, vocabulary specialization is largely a property of a router "
                        "that reads the token, trained or not." if reads_token else
                        ": most of the vocabulary specialization above the random baseline comes from training."))
    scores = run_scores(frame)
    lines.append(claim_check(scores, fine_shared, coarse, "DeepSeekMoE (fine-grained + shared experts specialise "
                             "more than coarse experts)")["verdict"])
    if fine is not None:
        lines.append(claim_check(scores, fine, coarse, "Ablation (fine-grained experts alone)")["verdict"])
    if runs is not None:
        loss = runs.groupby("name", sort=False)["val_loss"].agg(["mean", "std"])
        names = [n for n in (coarse, fine, fine_shared) if n in loss.index]
        lines.append("At this budget the validation losses of the granularity runs are "
                     + "; ".join(f"{n} {loss.loc[n, 'mean']:.4f} ± {loss.loc[n, 'std']:.4f}" for n in names) + ".")
    if micro is not None and global_ is not None:
        lines.append(claim_check(scores, global_, micro, "Qiu et al. (global-batch balancing specialises more "
                                 "than micro-batch)")["verdict"])
    if saturation is not None and len(saturation):
        sat = saturation_summary(saturation)
        parts = [f"{n} {r['saturation']:.2f} at step {r['step']:.0f} (random {r['baseline']:.2f})"
                 for n, r in sat.iterrows()]
        lines.append("Router saturation (top-k overlap with the final routing of the probe set, at the first "
                     "validation a tenth or more into training): " + "; ".join(parts) + ".")
    return lines


# --- a pretrained model on the same data ---------------------------------------------------------


def domain_windows(encode: Any, *, seq_len: int, windows_per_domain: int, vocab_size: int | None = None,
                   corpus: Any = None) -> tuple[list[tuple[Any, Any]], list[str]]:
    """Validation text of every domain of the built-in corpus (or ``corpus``), tokenised by ``encode``
    (str -> list of token ids, e.g. a Hugging Face tokenizer's ``encode``), packed into full windows of
    ``seq_len`` tokens (no padding: every token counts), at most ``windows_per_domain`` per domain.

    Returns ((tokens (B, S), domain ids (B, S)) pairs, one per domain, and the domain names), the input
    of ``workbench.interop.hf.collect_hf_routing``. ``vocab_size``: token ids at or above it are
    refused (a tokenizer that does not belong to the model)."""
    import torch

    from workbench.data.builtin import build_corpus

    check(isinstance(seq_len, int) and seq_len >= 1, "seq_len", "must be an integer >= 1", seq_len)
    check(isinstance(windows_per_domain, int) and windows_per_domain >= 1, "windows_per_domain",
          "must be an integer >= 1", windows_per_domain)
    corpus = build_corpus() if corpus is None else corpus
    _, val = corpus.split()
    batches, names = [], []
    for domain in corpus.domains:
        ids: list[int] = []
        need = seq_len * windows_per_domain
        for doc in val.documents:
            if doc.domain == domain and len(ids) < need:
                ids.extend(encode(doc.text))
        n = min(len(ids) // seq_len, windows_per_domain)
        if n == 0:
            continue
        tokens = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
        if vocab_size is not None and int(tokens.max()) >= vocab_size:
            raise ValueError(f"encode gives token id {int(tokens.max())}, outside the model's vocabulary of "
                             f"vocab_size={vocab_size}: use the model's own tokenizer")
        batches.append((tokens, torch.full_like(tokens, len(names))))
        names.append(domain)
    check(len(batches) > 0, "seq_len", "is longer than every domain's validation text", seq_len)
    return batches, names


# --- the committed full-mode results (the notebook's results mode) ------------------------------

# What the notebook's full mode commits: the runs table, every analysis per (run, seed, layer),
# router saturation, the validations, and the untrained model's analyses. The routing traces
# themselves (counts per run) are not committed: the figures drawn from them need full mode.
RESULTS_FILES = ("runs.csv", "specialization.csv", "saturation.csv", "evals.csv", "untrained.csv")


@dataclass
class CommittedResults:
    """The lab's committed tables: ``results`` has the runs and evals tables and no details
    (no traces), ``frame`` is ``specialization_frame``'s table, ``saturation`` is
    ``Results.saturation()``'s, ``untrained`` the untrained model's ``specialization_table``."""

    results: Results
    frame: Any
    saturation: Any
    untrained: Any


def load_results(folder: Any) -> CommittedResults:
    """The committed full-mode results in ``folder`` (``RESULTS_FILES``); FileNotFoundError naming
    any missing file."""
    import pandas as pd

    folder = require_files(folder, RESULTS_FILES)
    runs = pd.read_csv(folder / "runs.csv")
    results = Results(runs=runs, steps=pd.DataFrame(columns=["name", "seed", "step"]),
                      evals=pd.read_csv(folder / "evals.csv"), details={})
    return CommittedResults(results, pd.read_csv(folder / "specialization.csv"),
                            pd.read_csv(folder / "saturation.csv"), pd.read_csv(folder / "untrained.csv"))


def save_results(folder: Any, results: Results, frame: Any, saturation: Any, untrained: Any) -> Any:
    """Write the tables ``load_results`` reads into ``folder`` (full mode with ``SAVE_RESULTS``)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results.runs.to_csv(folder / "runs.csv", index=False)
    frame.to_csv(folder / "specialization.csv", index=False, float_format="%.6g")
    saturation.to_csv(folder / "saturation.csv", index=False, float_format="%.6g")
    results.evals.to_csv(folder / "evals.csv", index=False, float_format="%.6g")
    untrained.to_csv(folder / "untrained.csv", index=False, float_format="%.6g")
    return folder
