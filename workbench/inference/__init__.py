"""Running a trained MoE: the KV cache, sampling and ``generate`` (with the routing of every token).

    from workbench.inference import generate
    result = generate(model, ["12 + 35 =", "def add"], max_new_tokens=32, temperature=0.8, seed=0)

Read ``cache`` (what a decode step keeps), then ``sampling`` (how the next token is chosen), then
``generation`` (the loop, and the routing records).
"""

from workbench.inference.cache import KVCache
from workbench.inference.generation import (
    DecodeRefused,
    GenerationResult,
    GenerationStep,
    LayerRouting,
    decode_refusal,
    generate,
    stream_generate,
)
from workbench.inference.sampling import SamplingConfig, sample

__all__ = ["DecodeRefused", "GenerationResult", "GenerationStep", "KVCache", "LayerRouting", "SamplingConfig",
           "decode_refusal", "generate", "sample", "stream_generate"]
