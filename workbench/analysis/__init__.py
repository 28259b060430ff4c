"""Analyses of how a model routes: traces of single texts, domain specialization, and the router
zoo side by side (one fixed batch, before and after a short run).

- ``measure``: one fixed batch through one model, every MoE layer's routing and metrics;
- ``causality``: whether earlier logits depend on later tokens;
- ``runs``: a short training run per router, measured before and after;
- ``report``: table rows and sentences computed from runs;
- ``routing``: a single text's route, layer by layer, and domain specialization;
- ``traces``: streamed, bounded-memory routing counts of a model over a dataset;
- ``specialization``: the OLMoE specialization analyses of those counts, each beside the score of
  random routing with the same per-expert load;
- ``inference``: the routing of generated text (temporal locality against chance) and the
  inference-time knobs (a smaller top-k, dropped experts, a capacity limit), notebook 06;
- ``offload``: decode routing traces and the expert-cache simulator (LRU, LFU, Belady, next-layer
  prefetch), notebook 07;
- ``eplb``: expert placement with redundant replicas for expert-parallel serving, notebook 07.

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
from workbench.analysis.specialization import (
    Coactivation,
    CrossLayer,
    DomainSpecialization,
    Saturation,
    Scored,
    VocabularySpecialization,
    coactivation,
    cross_layer_consistency,
    domain_specialization_nmi,
    random_expert_sets,
    router_saturation,
    saturation_curve,
    specialization_table,
    vocabulary_specialization,
)
from workbench.analysis.traces import (
    ProbeRecorder,
    RoutingCollector,
    RoutingCounts,
    byte_classes,
    collect,
    probe_routing,
    ranked_experts,
)

__all__ = [
    "CAUSAL_TOLERANCE", "BatchRouting", "RouterRun", "RoutingTrace", "analyze_router", "build_model",
    "describe_routers", "domain_expert_mutual_information", "domain_specialization", "dropless_copy",
    "fixed_batch", "future_leak", "real_gates",
    "route_batch", "route_text", "router_config", "router_takeaways", "summary_rows", "train_router",
    # specialization
    "Coactivation", "CrossLayer", "DomainSpecialization", "ProbeRecorder", "RoutingCollector", "RoutingCounts",
    "Saturation", "Scored", "VocabularySpecialization", "byte_classes", "coactivation", "collect",
    "cross_layer_consistency", "domain_specialization_nmi", "probe_routing", "random_expert_sets", "ranked_experts",
    "router_saturation", "saturation_curve", "specialization_table", "vocabulary_specialization",
]
