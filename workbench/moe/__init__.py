"""The MoE layer and its parts, in pure PyTorch: routers, dispatch, experts, balancing and metrics.

Read in this order: ``types`` (the data passed between the parts), ``routers``, ``dispatch``
(with ``permutation`` and ``experts``), ``balance``, ``layer``, ``metrics``. Nothing here imports
the fused CPU kernels or expert parallelism: those import this package and convert or extend a
built layer (``workbench.kernels.cpu``, ``workbench.parallel``).
"""

from workbench.moe.balance import (
    assignment_counts,
    global_batch_aux_loss,
    router_z_loss,
    sequence_aux_loss,
    switch_aux_loss,
    update_router_bias,
)
from workbench.moe.config import MoEConfig
from workbench.moe.dispatch import DISPATCHES, build_dispatch, expert_capacity, soft_dispatch
from workbench.moe.experts import SwiGLUExperts, SwiGLUMLP, grouped_matmul
from workbench.moe.layer import MoELayer
from workbench.moe.metrics import load_metrics, routing_metrics, step_routing_metrics
from workbench.moe.routers import (
    ROUTERS,
    CausalLeakWarning,
    Router,
    SoftmaxGatedRouter,
    build_router,
    router_class,
)
from workbench.moe.types import DispatchStats, RouterOutput, RoutingInfo, SoftRouterOutput, SortedPairs

__all__ = [
    "DISPATCHES", "ROUTERS", "CausalLeakWarning", "DispatchStats", "MoEConfig", "MoELayer", "Router", "RouterOutput",
    "RoutingInfo", "SoftRouterOutput", "SoftmaxGatedRouter", "SortedPairs", "SwiGLUExperts", "SwiGLUMLP",
    "assignment_counts", "build_dispatch", "build_router", "expert_capacity", "global_batch_aux_loss", "grouped_matmul",
    "load_metrics", "router_class", "router_z_loss", "routing_metrics", "sequence_aux_loss", "soft_dispatch",
    "step_routing_metrics", "switch_aux_loss", "update_router_bias",
]
