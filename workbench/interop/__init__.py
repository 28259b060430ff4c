"""Interoperability with other frameworks' MoE models.

- ``hf``: Hugging Face ``transformers`` MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
  DeepSeek-V3): routing traces through hooks, and one MoE block's weights to a workbench
  ``MoELayer`` and back. ``transformers`` is optional: ``pip install 'moe-workbench[hf]'``.
"""

from workbench.interop.hf import (
    HF_FAMILIES,
    collect_hf_routing,
    hf_moe_blocks,
    hf_routing_hooks,
    moe_config_from_hf,
    moe_layer_from_hf,
    moe_layer_to_hf,
    replace_dispatch,
    router_from_hf,
)

__all__ = ["HF_FAMILIES", "collect_hf_routing", "hf_moe_blocks", "hf_routing_hooks", "moe_config_from_hf",
           "moe_layer_from_hf", "moe_layer_to_hf", "replace_dispatch", "router_from_hf"]
