"""A micro model config: small enough that a forward takes milliseconds."""

from workbench.config import ModelConfig, MoEConfig

# 4 experts, top-2, two MoE layers.
MICRO = ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=2, dense_hidden=64,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
