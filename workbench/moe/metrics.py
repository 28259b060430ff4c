"""Load statistics of one MoE layer's routing, for logs, plots and tables.

All are computed from counts and scores, without gradients, and returned as plain Python
numbers (per-expert values as lists) so they go straight into JSON lines or a DataFrame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from workbench.moe.types import RoutingInfo


@torch.no_grad()
def load_metrics(tokens_per_expert_E: torch.Tensor) -> dict[str, float | list[float]]:
    """Balance of an assignment count vector.

    - ``load_fraction``: c_i / sum_j c_j
    - ``cv``: coefficient of variation std(c) / mean(c) (population std; Shazeer et al. 2017)
    - ``max_vio``: max_i c_i / mean(c) - 1 (Wang et al. 2024, "MaxVio")
    - ``entropy``: entropy of the load fraction / log E, 1 = uniform, 0 = one expert takes all
    - ``unused_experts``: experts that received nothing
    """
    # E numbers: computed on the host from one transfer, not as a dozen tiny tensor ops
    load = [float(c) for c in tokens_per_expert_E.tolist()]
    E = len(load)
    total = max(sum(load), 1.0)
    mean = sum(load) / E
    frac = [c / total for c in load]
    entropy = -sum(f * math.log(f) for f in frac if f > 0) / math.log(E) if E > 1 else 1.0
    safe_mean = max(mean, 1e-12)
    std = math.sqrt(sum((c - mean) ** 2 for c in load) / E)
    return {
        "tokens_per_expert": load,
        "load_fraction": frac,
        "cv": std / safe_mean,
        "max_vio": max(load) / safe_mean - 1,
        "entropy": entropy,
        "unused_experts": sum(c == 0 for c in load),
    }


@torch.no_grad()
def routing_metrics(info: RoutingInfo) -> dict[str, float | list[float]]:
    """Everything above for one layer, plus dropping, confidence and gate mass.

    - ``dropped_fraction``: dropped token-expert assignments / all (real) assignments
    - ``dropped_token_fraction``: tokens that lost all their slots / tokens
    - ``router_confidence``: mean over tokens of the highest normalised router score
    - ``gate_mass``: share of the total combine weight that each expert receives, to read
      next to ``load_fraction`` (an expert can get many tokens with small weights)
    - ``experts_per_token``: mean real assignments per token (K, except for expert choice)
    - ``unrouted_token_fraction``: tokens with no assignment at all (expert choice: tokens no
      expert picked; 0 for every token-choice router)

    Expert choice (``mask_TK``): padding slots count nowhere; ``load_fraction`` is uniform by
    construction and the interesting numbers are ``experts_per_token`` and
    ``unrouted_token_fraction``. Soft MoE: every expert processes the same number of slots, so
    the load numbers describe *attribution* (each token's top_k experts by combine mass,
    ``SoftMoERouter``), ``gate_mass`` their share of that mass, and nothing is dropped.
    """
    routing, stats = info.router_output, info.stats
    T, K = routing.expert_ids_TK.shape
    E = routing.scores_TE.shape[1]
    weights_TK = routing.weights_TK
    if routing.mask_TK is None:  # every token has its K assignments: no tensor work needed
        num_assignments, experts_per_token, unrouted = T * K, float(K), 0.0
    else:
        assignments_T = routing.mask_TK.sum(dim=1)
        weights_TK = weights_TK * routing.mask_TK
        num_assignments = int(assignments_T.sum())
        experts_per_token = assignments_T.double().mean().item()
        unrouted = (assignments_T == 0).double().mean().item()
    out = load_metrics(stats.tokens_per_expert)
    out["dropped_fraction"] = stats.dropped_assignments.item() / max(1, num_assignments)
    out["dropped_token_fraction"] = stats.dropped_tokens.item() / T
    # max_e (s_te / sum_e s_te) = (max_e s_te) / sum_e s_te: a row's division cannot change its maximum
    scores_TE = routing.scores_TE
    out["router_confidence"] = (scores_TE.max(dim=-1).values / scores_TE.sum(dim=-1)).mean().item()
    mass_E = torch.bincount(routing.expert_ids_TK.flatten(), weights=weights_TK.flatten().double(), minlength=E)
    out["gate_mass"] = (mass_E / mass_E.sum().clamp(min=1e-12)).tolist()
    out["experts_per_token"] = experts_per_token
    out["unrouted_token_fraction"] = unrouted
    return out


def step_routing_metrics(infos: Sequence[RoutingInfo], moe_layers: Sequence[int],
                         loss_weights: dict[str, float]) -> dict[str, float | list[float]]:
    """One training step's routing columns of the metrics log, from every MoE layer's ``RoutingInfo``:
    ``raw/<loss>`` and ``weighted/<loss>`` (mean over layers), ``L<i>/<metric>`` (``routing_metrics``
    and each balancing loss of layer ``i``) and ``max_vio`` (mean over layers). The PyTorch and
    MindSpore trainers both write these, so the same plots read either log."""
    row: dict[str, float | list[float]] = {}
    for name in infos[0].losses:
        row[f"raw/{name}"] = sum(info.losses[name].item() for info in infos) / len(infos)
        row[f"weighted/{name}"] = loss_weights[name] * row[f"raw/{name}"]
    max_vios = []
    for layer_idx, info in zip(moe_layers, infos, strict=True):
        m = routing_metrics(info)
        for name, value in info.losses.items():
            m[name] = value.item()
        max_vios.append(m["max_vio"])
        row.update({f"L{layer_idx}/{k}": v for k, v in m.items()})
    row["max_vio"] = sum(max_vios) / len(max_vios)
    return row
