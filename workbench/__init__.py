"""moe-workbench: a research workbench for Mixture-of-Experts language models.

The names below are imported when first used (PEP 562), so ``import workbench.cli`` does not
import torch: the ``workbench`` command can then take Ctrl-C during its slow start (torch, the
subcommands) and end with one line instead of a ``KeyboardInterrupt`` traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "workbench.config", "MoEConfig": "workbench.config", "preset": "workbench.config",
    "ModelOutput": "workbench.model", "MoELM": "workbench.model",
    "MoELayer": "workbench.moe", "RoutingInfo": "workbench.moe", "load_metrics": "workbench.moe",
    "routing_metrics": "workbench.moe", "load_model": "workbench.load", "generate": "workbench.inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once imported, an ordinary attribute
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
