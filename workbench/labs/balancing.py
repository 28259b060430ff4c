"""The load-balancing lab (``notebooks/02_load_balancing.ipynb``): what it trains and how it judges.

Three groups of runs on the same data and budget (one base model and one ``TrainConfig``):

- ``methods``: every balancing method side by side (``METHODS``);
- ``accumulation``: the Switch auxiliary loss with its expert frequencies counted per
  micro-batch or over the whole optimizer step (Qiu et al. 2025), under gradient accumulation;
- ``capacity``: the capacity dispatch at several capacity factors and both drop policies,
  against the dropless dispatch.

``claim_check`` tests the qualitative claim of Wang et al. 2024 on the ``methods`` table.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from workbench.config import ModelConfig
from workbench.experiments import Experiment, Results
from workbench.labs.modes import require_files
from workbench.train.config import TrainConfig
from workbench.validation import check

# name -> (family, MoEConfig fields). Every method starts from the base model with all balancing
# switched off, so a method is exactly the fields listed.
_OFF = {"aux_loss_weight": 0.0, "seq_aux_loss_weight": 0.0, "z_loss_weight": 0.0, "bias_update_rate": 0.0}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    # Switch Transformer / GShard (Fedus et al. 2021 use 1e-2)
    "aux 1e-3": ("aux loss", {"aux_loss_weight": 1e-3}),
    "aux 1e-2": ("aux loss", {"aux_loss_weight": 1e-2}),
    "aux 1e-1": ("aux loss", {"aux_loss_weight": 1e-1}),
    # ST-MoE: the auxiliary loss plus the router z-loss (Zoph et al. 2022 use 1e-3)
    "aux 1e-2 + z 1e-3": ("aux loss", {"aux_loss_weight": 1e-2, "z_loss_weight": 1e-3}),
    # DeepSeek-V3's sequence-wise loss, here alone and at a full weight
    "seq-aux 1e-2": ("sequence aux", {"seq_aux_loss_weight": 1e-2}),
    # Auxiliary-loss-free balancing (Wang et al. 2024; their rate is u = 1e-3)
    "loss-free 1e-4": ("loss-free", {"bias_update_rate": 1e-4}),
    "loss-free 1e-3": ("loss-free", {"bias_update_rate": 1e-3}),
    "loss-free 1e-2": ("loss-free", {"bias_update_rate": 1e-2}),
    "loss-free 1e-3 proportional": ("loss-free", {"bias_update_rate": 1e-3, "bias_update_rule": "proportional"}),
    "loss-free 1e-3 recentred": ("loss-free", {"bias_update_rate": 1e-3, "bias_recenter": True}),
    # Expert choice (Zhou et al. 2022): balanced by construction. Its training routing reads the
    # whole sequence, so validation routes causally (token choice on the same scores).
    "expert choice": ("expert choice", {"router": "expert_choice", "expert_choice_eval": "token_choice"}),
}

# The pair the reproduction compares: Wang et al.'s rate, and the Switch Transformer's weight.
CLAIM_LOSS_FREE, CLAIM_BASELINE = "loss-free 1e-3", "aux 1e-2"


def _moe(base: ModelConfig, **fields: Any) -> ModelConfig:
    check(base.moe is not None, "base", "must be an MoE model (its moe config is None)", base.moe)
    moe = replace(base.moe, **{**_OFF, **fields})
    if moe.router == "expert_choice":
        moe = replace(moe, top_k=base.moe.top_k)
    return base.replace(moe=moe)


def method_experiments(base: ModelConfig, train: TrainConfig, methods: list[str] | None = None) -> list[Experiment]:
    """One experiment per balancing method (``METHODS``; ``methods`` picks some, in that order)."""
    names = list(METHODS) if methods is None else methods
    unknown = [m for m in names if m not in METHODS]
    check(not unknown, "methods", f"names must be among {', '.join(METHODS)}", unknown)
    return [Experiment(name=m, model=_moe(base, **METHODS[m][1]), train=train,
                       tags={"group": "methods", "family": METHODS[m][0]}) for m in names]


def accumulation_experiments(base: ModelConfig, train: TrainConfig, *, micro_batch: int, aux_loss_weight: float = 1e-2
                             ) -> list[Experiment]:
    """The auxiliary loss per micro-batch vs over the global batch, at the same global batch.

    ``train.batch_size`` sequences per optimizer step are split into micro-batches of
    ``micro_batch`` sequences (gradient accumulation), so the two runs see the same tokens in the
    same order and differ only in which tokens the expert frequencies f_i count.
    """
    check(isinstance(micro_batch, int) and micro_batch >= 1 and train.batch_size % micro_batch == 0, "micro_batch",
          f"must divide the global batch of batch_size={train.batch_size} sequences", micro_batch)
    accum = train.batch_size // micro_batch * train.grad_accum
    split = replace(train, batch_size=micro_batch, grad_accum=accum)
    label = {"micro_batch": "micro-batch", "global_batch": "global-batch"}
    return [Experiment(name=f"aux {aux_loss_weight:g} {label[scope]} (accum {accum})",
                       model=_moe(base, aux_loss_weight=aux_loss_weight, aux_loss_scope=scope), train=split,
                       tags={"group": "accumulation", "aux_loss_scope": scope})
            for scope in ("micro_batch", "global_batch")]


def capacity_experiments(base: ModelConfig, train: TrainConfig, *, factors: list[float],
                         policies: tuple[str, ...] = ("position", "score"), aux_loss_weight: float = 1e-2,
                         seeds: tuple[int, ...] | None = None) -> list[Experiment]:
    """The capacity dispatch at each factor and drop policy, and the dropless (sorted) dispatch,
    all with the same auxiliary loss (a capacity dispatch is always trained with one)."""
    runs = [Experiment(name="dropless", model=_moe(base, aux_loss_weight=aux_loss_weight, dispatch="sorted"),
                       train=train, tags={"group": "capacity", "capacity_factor": math.inf, "drop_policy": "none"},
                       seeds=seeds)]
    for policy in policies:
        for factor in factors:
            runs.append(Experiment(
                name=f"capacity {factor:g} {policy}",
                model=_moe(base, aux_loss_weight=aux_loss_weight, dispatch="capacity", capacity_factor=factor,
                           drop_policy=policy),
                train=train, tags={"group": "capacity", "capacity_factor": factor, "drop_policy": policy},
                seeds=seeds))
    return runs


# --- the claim -----------------------------------------------------------------------------------

# "Much lower" MaxVio: at most this fraction of the baseline's (Wang et al. report 0.04 vs 0.72
# for 1B and 0.04 vs 0.52 for 3B, ratios of 0.06 and 0.08).
MUCH_LOWER = 0.5
# "No worse within seed noise": the mean validation loss is higher by at most this many standard
# errors of the difference of the two means.
NOISE_SE = 2.0


def _stats(runs: Any, name: str, metric: str) -> tuple[float, float, int]:
    values = runs.loc[runs["name"] == name, metric].astype(float)
    check(len(values) > 0, "name", "must be a method in the runs table", name)
    n = len(values)
    return float(values.mean()), float(values.std(ddof=1)) if n > 1 else float("nan"), n


def _difference(runs: Any, a: str, b: str, metric: str) -> tuple[float, float, bool]:
    """Mean of ``metric`` for ``a`` minus that for ``b``, its standard error, and whether it is paired.

    A seed fixes the initialisation and the order of the batches, so runs of two methods with the
    same seed share most of their noise: where both have the same seeds the difference is taken
    per seed and SE = std(d) / sqrt(n) (a paired comparison); otherwise SE = sqrt(s_a^2 / n_a +
    s_b^2 / n_b). NaN when there are too few seeds for a spread.
    """
    va = runs.loc[runs["name"] == a].set_index("seed")[metric].astype(float)
    vb = runs.loc[runs["name"] == b].set_index("seed")[metric].astype(float)
    if set(va.index) == set(vb.index):
        d = va - vb.loc[va.index]
        se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        return float(d.mean()), se, True
    se = math.sqrt(va.var(ddof=1) / len(va) + vb.var(ddof=1) / len(vb)) if min(len(va), len(vb)) > 1 else float("nan")
    return float(va.mean() - vb.mean()), se, False


def claim_check(runs: Any, loss_free: str = CLAIM_LOSS_FREE, baseline: str = CLAIM_BASELINE) -> dict[str, Any]:
    """Wang et al. 2024's claim at our scale, from the runs table of ``run_experiments``.

    Claim: at a matched budget, loss-free balancing reaches a much lower global MaxVio than the
    auxiliary loss (at most ``MUCH_LOWER`` times the baseline's mean), at a validation loss no
    worse within seed noise (mean difference <= ``NOISE_SE`` standard errors of the difference,
    paired over seeds when both have the same seeds: ``_difference``). Both thresholds are fixed
    here, before any run. Needs at least 2 seeds per method for the noise part; with fewer it
    says so.
    """
    out: dict[str, Any] = {"loss_free": loss_free, "baseline": baseline}
    for key, metric in (("max_vio", "max_vio_global"), ("val_loss", "val_loss")):
        for who, name in (("loss_free", loss_free), ("baseline", baseline)):
            mean, std, n = _stats(runs, name, metric)
            out[f"{who}_{key}"], out[f"{who}_{key}_std"], out[f"{who}_seeds"] = mean, std, n
    out["max_vio_ratio"] = out["loss_free_max_vio"] / out["baseline_max_vio"] if out["baseline_max_vio"] else math.inf
    out["val_loss_diff"], out["val_loss_diff_se"], out["paired"] = _difference(runs, loss_free, baseline, "val_loss")
    out["balance_holds"] = out["max_vio_ratio"] <= MUCH_LOWER
    if math.isnan(out["val_loss_diff_se"]):
        out["quality_holds"] = None
    else:
        out["quality_holds"] = out["val_loss_diff"] <= NOISE_SE * out["val_loss_diff_se"]
    out["reproduced"] = None if out["quality_holds"] is None else bool(out["balance_holds"] and out["quality_holds"])
    out["verdict"] = _verdict(out)
    return out


def _z(diff: float, se: float) -> float:
    if se > 0:
        return diff / se
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)


def _verdict(c: dict[str, Any]) -> str:
    lf, base = c["loss_free"], c["baseline"]
    balance = (f"global MaxVio {c['loss_free_max_vio']:.3f} ± {c['loss_free_max_vio_std']:.3f} ({lf}) vs "
               f"{c['baseline_max_vio']:.3f} ± {c['baseline_max_vio_std']:.3f} ({base}), a ratio of "
               f"{c['max_vio_ratio']:.2f} ({'<=' if c['balance_holds'] else '>'} {MUCH_LOWER}: "
               f"{'much lower' if c['balance_holds'] else 'not much lower'})")
    quality = (f"validation loss {c['loss_free_val_loss']:.4f} ± {c['loss_free_val_loss_std']:.4f} vs "
               f"{c['baseline_val_loss']:.4f} ± {c['baseline_val_loss_std']:.4f}, a difference of "
               f"{c['val_loss_diff']:+.4f}")
    if c["quality_holds"] is None:
        return (f"{balance}; {quality}. With {min(c['loss_free_seeds'], c['baseline_seeds'])} seed(s) there is "
                "no seed noise to judge the loss difference by: run at least 2 seeds (full mode runs 3).")
    quality += (f" = {_z(c['val_loss_diff'], c['val_loss_diff_se']):+.1f} standard errors "
                f"{'of the per-seed difference' if c['paired'] else 'of the difference'} "
                f"({'no worse within' if c['quality_holds'] else 'worse beyond'} seed noise, "
                f"threshold +{NOISE_SE:g} SE)")
    result = "reproduced" if c["reproduced"] else "not reproduced"
    mean_std = f"mean ± std over {c['loss_free_seeds']} and {c['baseline_seeds']} seeds"
    return f"Claim {result} at this scale: {balance}; {quality}. ({mean_std})"


def _mean_std(runs: Any, name: str, metric: str) -> str:
    mean, std, _ = _stats(runs, name, metric)
    return f"{mean:.3f} ± {std:.3f}" if std == std else f"{mean:.3f}"


def specialization_check(runs: Any, micro: str, global_: str) -> dict[str, Any]:
    """Qiu et al. 2025's claim on the accumulation pair: global-batch balancing lets experts
    specialise more. Specialization is the domain-expert mutual information (``domain_mi``);
    "more" means higher by more than ``NOISE_SE`` standard errors of the difference
    (``_difference``: paired over seeds when both runs have the same seeds)."""
    out: dict[str, Any] = {"micro": micro, "global": global_}
    for key, name in (("micro", micro), ("global", global_)):
        for metric in ("domain_mi", "max_vio_batch", "max_vio_global", "val_loss"):
            out[f"{key}_{metric}"], out[f"{key}_{metric}_std"], out[f"{key}_seeds"] = _stats(runs, name, metric)
    diff, se, paired = _difference(runs, global_, micro, "domain_mi")
    out["domain_mi_diff"], out["domain_mi_diff_se"], out["paired"] = diff, se, paired
    if math.isnan(se):
        finding = "too few seeds to judge the difference against seed noise"
        out["more_specialised"] = None
    else:
        out["more_specialised"] = diff > NOISE_SE * se
        finding = (f"a difference of {diff:+.4f} bits = {_z(diff, se):+.1f} standard errors"
                   f"{' of the per-seed difference' if paired else ''}: "
                   + ("global-batch experts are more domain-specific" if out["more_specialised"] else
                      "not more domain-specific beyond seed noise (threshold +2 SE)"))
    out["verdict"] = (
        f"domain-expert mutual information {_mean_std(runs, global_, 'domain_mi')} bits (global-batch) vs "
        f"{_mean_std(runs, micro, 'domain_mi')} (micro-batch), {finding}. Training-batch MaxVio "
        f"{_mean_std(runs, global_, 'max_vio_batch')} vs {_mean_std(runs, micro, 'max_vio_batch')}; validation "
        f"loss {_mean_std(runs, global_, 'val_loss')} vs {_mean_std(runs, micro, 'val_loss')}.")
    return out


def takeaways(runs: Any) -> list[str]:
    """The lab's conclusions as sentences, each computed from the runs table."""
    lines = []
    methods = runs[runs["group"] == "methods"]
    if len(methods):
        by = methods.groupby("name", sort=False)[["val_loss", "max_vio_global"]].mean()
        best_loss, best_balance = by["val_loss"].idxmin(), by["max_vio_global"].idxmin()
        worst_balance = by["max_vio_global"].idxmax()
        loss, vio = by["val_loss"], by["max_vio_global"]
        lines.append(f"Lowest mean validation loss: {best_loss} ({loss[best_loss]:.4f}); most balanced on the "
                     f"validation set: {best_balance} (global MaxVio {vio[best_balance]:.3f}); least balanced: "
                     f"{worst_balance} ({vio[worst_balance]:.3f}).")
        if {"none", "aux 1e-2"} <= set(by.index):
            lines.append(f"Without balancing the global MaxVio is {vio['none']:.3f}; the auxiliary loss at 1e-2 "
                         f"brings it to {vio['aux 1e-2']:.3f} at a validation loss of {loss['aux 1e-2']:.4f} vs "
                         f"{loss['none']:.4f}.")
        if {CLAIM_LOSS_FREE, CLAIM_BASELINE} <= set(by.index):
            lines.append(claim_check(methods)["verdict"])
    acc = runs[runs["group"] == "accumulation"]
    if len(acc) and acc["name"].nunique() == 2:
        micro, global_ = (acc.loc[acc["aux_loss_scope"] == s, "name"].iloc[0] for s in ("micro_batch", "global_batch"))
        lines.append("Micro- vs global-batch auxiliary loss: " + specialization_check(runs, micro, global_)["verdict"])
    cap = runs[runs["group"] == "capacity"]
    if len(cap):
        cols = ["dropped_fraction", "eval_dropped_fraction", "val_loss", "dropless_val_loss", "step_time_s"]
        by = cap.groupby("name", sort=False)[[c for c in cols if c in cap]].mean()
        for name, r in by.drop(index="dropless", errors="ignore").iterrows():
            line = (f"Capacity, {name}: drops {r['dropped_fraction']:.1%} of the training assignments and "
                    f"{r.get('eval_dropped_fraction', float('nan')):.1%} of the validation ones; validation loss "
                    f"{r['val_loss']:.4f} with the capacity dispatch, {r.get('dropless_val_loss', float('nan')):.4f} "
                    f"with the same weights dropless; median step time {r['step_time_s'] * 1e3:.0f} ms")
            if "dropless" in by.index:
                d = by.loc["dropless"]
                line += f" (dropless: validation loss {d['val_loss']:.4f}, {d['step_time_s'] * 1e3:.0f} ms)"
            lines.append(line + ".")
    return lines


# --- the committed full-mode results (the notebook's results mode) ------------------------------

RESULTS_FILES = ("runs.csv", "evals.csv", "steps.csv.gz", "details.json.gz")  # what Results.save writes


def load_results(folder: Any) -> Results:
    """The committed full-mode results of the lab (``Results.save``'s files in ``folder``), every
    table and each run's details, as ``run_experiments`` returned them; FileNotFoundError naming
    any missing file."""
    return Results.load(require_files(folder, RESULTS_FILES))
