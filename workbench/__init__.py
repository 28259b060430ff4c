"""moe-workbench: a research workbench for Mixture-of-Experts language models."""

from workbench.config import ModelConfig, MoEConfig, preset
from workbench.model import ModelOutput, MoELM
from workbench.moe import MoELayer, RoutingInfo, load_metrics, routing_metrics

__version__ = "0.1.0"
__all__ = [
    "MoEConfig", "MoELM", "MoELayer", "ModelConfig", "ModelOutput", "RoutingInfo", "load_metrics",
    "preset", "routing_metrics",
]
