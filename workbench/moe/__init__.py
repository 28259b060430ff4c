"""The MoE layer and its parts: routers, experts, dispatch, balancing and metrics."""

from workbench.moe.balance import (
    assignment_counts,
    global_batch_aux_loss,
    router_z_loss,
    sequence_aux_loss,
    switch_aux_loss,
    update_router_bias,
)
from workbench.moe.config import MoEConfig
from workbench.moe.dispatch import DISPATCHES, DispatchStats, build_dispatch, expert_capacity, soft_dispatch
from workbench.moe.experts import SwiGLUExperts, SwiGLUMLP, grouped_matmul
from workbench.moe.layer import MoELayer, RoutingInfo
from workbench.moe.metrics import load_metrics, routing_metrics, step_routing_metrics
from workbench.moe.routers import (
    ROUTERS,
    CausalLeakWarning,
    Router,
    RouterOutput,
    SoftmaxGatedRouter,
    SoftRouterOutput,
    build_router,
    router_class,
)

__all__ = [
    "DISPATCHES", "ROUTERS", "CausalLeakWarning", "DispatchStats", "MoEConfig", "MoELayer", "Router", "RouterOutput",
    "RoutingInfo", "SoftRouterOutput", "SoftmaxGatedRouter", "SwiGLUExperts", "SwiGLUMLP", "assignment_counts",
    "build_dispatch", "build_router", "expert_capacity", "global_batch_aux_loss", "grouped_matmul", "load_metrics",
    "router_class", "router_z_loss", "routing_metrics", "sequence_aux_loss", "soft_dispatch", "step_routing_metrics",
    "switch_aux_loss", "update_router_bias",
]
