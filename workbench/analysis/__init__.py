"""Analyses of how a trained model routes: traces of single texts, domain specialization,
and the router zoo side by side (one fixed batch, before and after a short run)."""

from workbench.analysis.routers import (
    BatchRouting,
    RouterRun,
    analyze_router,
    describe_routers,
    fixed_batch,
    future_leak,
    route_batch,
    router_config,
    router_takeaways,
    summary_rows,
    train_router,
)
from workbench.analysis.routing import RoutingTrace, domain_specialization, route_text

__all__ = [
    "BatchRouting", "RouterRun", "RoutingTrace", "analyze_router", "describe_routers", "domain_specialization",
    "fixed_batch", "future_leak", "route_batch", "route_text", "router_config", "router_takeaways", "summary_rows",
    "train_router",
]
