"""Report text for a comparison of routers: what each router is, one table row per run, and
sentences computed from the rows, so a notebook states nothing its run did not compute."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from workbench.analysis.causality import CAUSAL_TOLERANCE
from workbench.moe import ROUTERS

if TYPE_CHECKING:
    from workbench.analysis.runs import RouterRun


def describe_routers() -> list[dict[str, str]]:
    """One row per router in ``ROUTERS``: its name, class and the first line of its docstring."""
    rows = []
    for name, cls in ROUTERS.items():
        doc = (cls.__doc__ or "").strip()
        # the first sentence, which may wrap over several lines of the docstring
        first = " ".join(doc.split("\n\n")[0].split())
        rows.append({"router": name, "class": cls.__name__, "what it does": first})
    return rows


def summary_rows(runs: Mapping[str, RouterRun] | Sequence[RouterRun],
                 tolerance: float = CAUSAL_TOLERANCE) -> list[dict[str, Any]]:
    """One plain dict per run: balance on the fixed batch at initialisation and after training
    (averaged over the MoE layers; ``unused`` summed), dropping, gates, causality, loss, speed.

    ``causal_train`` / ``causal_eval``: whether ``future_leak`` (dropless) stayed within
    ``tolerance`` in training / evaluation mode; a router that is not causal at evaluation has a
    validation loss that is not comparable with the causal routers'. ``leak_eval_capacity``: the
    same measurement through the capacity dispatch, as the model was trained and evaluated.
    """
    items = runs.values() if isinstance(runs, Mapping) else runs
    rows = []
    for run in items:
        b0, b1 = run.init.balance(), run.trained.balance()
        rows.append({
            "router": run.router,
            "top_k": run.trained.top_k,
            "causal_train": run.causal("train", tolerance),
            "causal_eval": run.causal("eval", tolerance),
            "max_vio_init": b0["max_vio"], "max_vio_trained": b1["max_vio"],
            "cv_init": b0["cv"], "cv_trained": b1["cv"],
            "entropy_init": b0["entropy"], "entropy_trained": b1["entropy"],
            "unused_init": int(b0["unused_experts"]), "unused_trained": int(b1["unused_experts"]),
            "dropped_init": b0["dropped_fraction"], "dropped_trained": b1["dropped_fraction"],
            "experts_per_token": b1["experts_per_token"],
            "mean_gate": b1["mean_gate"],
            "confidence": b1["router_confidence"],
            "leak_eval_capacity": run.leak["eval_capacity"],
            "val_loss": run.val_loss,
            "tokens_per_s": run.tokens_per_s,
        })
    return rows


def _extreme(rows: Sequence[dict[str, Any]], key: str, lowest: bool = True) -> tuple[float, str]:
    """The lowest (or highest) finite value of ``key`` and the routers that reach it (ties: all)."""
    finite = [r for r in rows if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    if not finite:
        raise ValueError(f"no finite {key!r} in the rows")
    value = (min if lowest else max)(r[key] for r in finite)
    return value, _names(r for r in finite if r[key] == value)


def _names(rows: Iterable[dict[str, Any]]) -> str:
    names = [r["router"] for r in rows]
    return ", ".join(names) if names else "none"


def router_takeaways(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences computed from ``summary_rows``: extremes and counts, nothing else."""
    if not rows:
        return []
    out = []
    (lo, lo_names), (hi, hi_names) = _extreme(rows, "max_vio_trained"), _extreme(rows, "max_vio_trained", False)
    out.append(f"lowest MaxVio after training: {lo_names} ({lo:.3f}); highest: {hi_names} ({hi:.3f})")
    fell = [r for r in rows if r["max_vio_trained"] < r["max_vio_init"]]
    out.append(f"MaxVio fell from initialisation to the end of training for {len(fell)} of {len(rows)} routers: "
               f"{_names(fell)}")
    most, most_names = _extreme(rows, "dropped_trained", lowest=False)
    none_dropped = [r for r in rows if r["dropped_trained"] == 0]
    out.append(f"most assignments dropped after training: {most_names} ({most:.1%}); "
               f"routers that dropped nothing on the batch: {_names(none_dropped)}")
    unused = [r for r in rows if r["unused_trained"] > 0]
    out.append("experts left without any assignment after training: "
               + (", ".join(f"{r['router']} ({r['unused_trained']})" for r in unused) if unused else "none"))
    comparable = [r for r in rows if r["causal_eval"]]
    not_causal = [r for r in rows if not r["causal_eval"]]
    if comparable:
        best, best_names = _extreme(comparable, "val_loss")
        out.append(f"lowest validation loss among the routers that are causal at evaluation (the router alone, "
                   f"dropless): {best_names} ({best:.3f} nats/byte); not comparable (not causal at evaluation): "
                   f"{_names(not_causal)}")
    train_only = [r for r in rows if r["causal_eval"] and not r["causal_train"]]
    if train_only:
        out.append(f"causal at evaluation but not in training (the training loss reads later tokens): "
                   f"{_names(train_only)}")
    via_drops = [r for r in rows if r["causal_eval"] and r["leak_eval_capacity"] > CAUSAL_TOLERANCE]
    if via_drops:
        worst, worst_names = _extreme(via_drops, "leak_eval_capacity", lowest=False)
        out.append(f"causal routers whose earlier logits still moved with later tokens through the capacity "
                   f"dispatch's drops: {len(via_drops)} of {len(comparable)} (largest change {worst_names}, "
                   f"{worst:.3g}): {_names(via_drops)}")
    (fast, fast_names), (slow, slow_names) = _extreme(rows, "tokens_per_s", False), _extreme(rows, "tokens_per_s")
    out.append(f"highest training throughput: {fast_names} ({fast:,.0f} tokens/s); "
               f"lowest: {slow_names} ({slow:,.0f} tokens/s)")
    return out
