"""Analyses of how a model routes: traces of single texts, domain specialization, and the router
zoo side by side (one fixed batch, before and after a short run).

- ``measure``: one fixed batch through one model, every MoE layer's routing and metrics;
- ``causality``: whether earlier logits depend on later tokens;
- ``runs``: a short training run per router, measured before and after;
- ``report``: table rows and sentences computed from runs;
- ``routing``: a single text's route, layer by layer, and domain specialization.

The figures for all of them are in ``workbench.viz``.
"""

from workbench.analysis.causality import CAUSAL_TOLERANCE, dropless_copy, future_leak
from workbench.analysis.measure import (
    BatchRouting,
    analyze_router,
    build_model,
    fixed_batch,
    real_gates,
    route_batch,
    router_config,
)
from workbench.analysis.report import describe_routers, router_takeaways, summary_rows
from workbench.analysis.routing import RoutingTrace, domain_expert_mutual_information, domain_specialization, route_text
from workbench.analysis.runs import RouterRun, train_router

__all__ = [
    "CAUSAL_TOLERANCE", "BatchRouting", "RouterRun", "RoutingTrace", "analyze_router", "build_model",
    "describe_routers", "domain_expert_mutual_information", "domain_specialization", "dropless_copy",
    "fixed_batch", "future_leak", "real_gates",
    "route_batch", "route_text", "router_config", "router_takeaways", "summary_rows", "train_router",
]
