"""Weights between the PyTorch ``MoELM`` and the MindSpore one, both ways, through safetensors.

Both models store every tensor in the same layout (linear weights as (out, in), experts stacked as
E x D x H / E x H x D), so conversion is a renaming; no tensor is transposed or reshaped. The
MindSpore cells hold their weights as bare ``Parameter``s, so names lose torch's module suffix
``.weight`` where the PyTorch side has an ``nn.Linear`` or ``nn.Embedding``:

=====================================================  =============================================
PyTorch (``state_dict`` / checkpoint ``model/...``)     MindSpore (``Parameter.name``)
=====================================================  =============================================
``embed.weight``                                        ``embed``
``lm_head.weight`` (absent in MindSpore when tied)      ``lm_head``
``blocks.{i}.attn.qkv.weight``                          ``blocks.{i}.attn.qkv``
``blocks.{i}.attn.out.weight``                          ``blocks.{i}.attn.out``
``blocks.{i}.ffn.w{1,2,3}.weight`` (dense FFN)          ``blocks.{i}.ffn.w{1,2,3}``
``blocks.{i}.ffn.shared_experts.w{1,2,3}.weight``       ``blocks.{i}.ffn.shared_experts.w{1,2,3}``
``blocks.{i}.ffn.shared_gate.weight``                   ``blocks.{i}.ffn.shared_gate``
``blocks.{i}.ffn.router.weight``                        ``blocks.{i}.ffn.router.weight`` (same)
``blocks.{i}.ffn.router.bias`` (loss-free balancing)    ``blocks.{i}.ffn.router.bias`` (same; no grad)
``blocks.{i}.ffn.experts.w{1,2,3}``                     ``blocks.{i}.ffn.experts.w{1,2,3}`` (same)
``blocks.{i}.{attn_norm,ffn_norm}.weight``, ``norm.weight``  the same names
=====================================================  =============================================

Files are written with the PyTorch names (``save_safetensors``), so one file loads into either
framework: ``torch_model.load_state_dict(safetensors.torch.load_file(path))`` or
``load_safetensors(path)`` here. ``load_torch_checkpoint`` reads a trainer checkpoint
(``ckpt-*.safetensors``, tensors under ``model/``, the ``ModelConfig`` in its metadata) with
safetensors' numpy API, so it needs no torch tensors at all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from workbench.config import ModelConfig
from workbench.ms._import import require_mindspore

if TYPE_CHECKING:
    import torch

    from workbench.ms.model import MoELM as MSMoELM

# torch names of nn.Linear / nn.Embedding weights: MindSpore drops the ".weight"
_SUFFIXED = re.compile(r"^(embed|lm_head|blocks\.\d+\.attn\.(qkv|out)|blocks\.\d+\.ffn\.(w[123]|shared_gate)"
                       r"|blocks\.\d+\.ffn\.shared_experts\.w[123])\.weight$")
_FORMAT = "moe-workbench-weights-1"


def ms_name(torch_name: str) -> str:
    """The MindSpore parameter name of a PyTorch state-dict key (the table above)."""
    m = _SUFFIXED.match(torch_name)
    return m.group(1) if m else torch_name


def torch_name(ms_param_name: str) -> str:
    """The PyTorch state-dict key of a MindSpore parameter name (the table above, read right to left)."""
    candidate = ms_param_name + ".weight"
    return candidate if _SUFFIXED.match(candidate) else ms_param_name


def _ms_params(model: MSMoELM) -> dict[str, Any]:
    return {p.name: p for p in model.get_parameters()}


def to_numpy_state(model: MSMoELM) -> dict[str, np.ndarray]:
    """The MindSpore model's weights under their PyTorch names, as float32 numpy arrays; a tied
    model also gets ``lm_head.weight`` (the embedding), as the PyTorch state dict has it."""
    state = {torch_name(n): p.asnumpy().copy() for n, p in _ms_params(model).items()}
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"].copy()
    return state


def load_numpy_state(model: MSMoELM, state: dict[str, np.ndarray]) -> MSMoELM:
    """Load PyTorch-named arrays into the MindSpore model; ``ValueError`` names a missing, extra or
    misshapen tensor. Returns the model."""
    ms = require_mindspore()
    params = _ms_params(model)
    wanted = {torch_name(n): n for n in params}
    given = dict(state)
    if model.cfg.tie_embeddings:
        given.pop("lm_head.weight", None)  # the embedding, once more
    missing = sorted(set(wanted) - set(given))
    extra = sorted(set(given) - set(wanted))
    if missing:
        raise ValueError(f"weights: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                         "is the file from a model with this ModelConfig?")
    if extra:
        hint = (" (a router bias exists only with bias_update_rate > 0)" if extra[0].endswith("router.bias") else "")
        raise ValueError(f"weights: tensor {extra[0]!r} is not part of this model{hint}")
    for key, name in wanted.items():
        value = np.asarray(given[key], dtype=np.float32)
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"weights: tensor {key!r} has shape {tuple(value.shape)}, the model's "
                             f"{name!r} has {tuple(params[name].shape)}")
        # in place, so that graphs compiled before the load (GRAPH mode) read the new weights
        ms.ops.assign(params[name], ms.Tensor(value))
    return model


def torch_state_numpy(torch_model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A PyTorch model's state dict as float32 numpy arrays (the non-persistent buffers are not in it)."""
    return {k: v.detach().float().cpu().numpy().copy() for k, v in torch_model.state_dict().items()}


def from_torch(torch_model: torch.nn.Module, block_rows: int = 64) -> MSMoELM:
    """A MindSpore ``MoELM`` with the PyTorch model's config and the very same weights."""
    from workbench.ms.model import MoELM

    return load_numpy_state(MoELM(torch_model.cfg, block_rows=block_rows), torch_state_numpy(torch_model))


def to_torch(model: MSMoELM) -> torch.nn.Module:
    """A PyTorch ``MoELM`` with the MindSpore model's config and weights (strict load)."""
    import torch

    from workbench.model import MoELM

    out = MoELM(model.cfg)
    out.load_state_dict({k: torch.from_numpy(v) for k, v in to_numpy_state(model).items()}, strict=True)
    return out


def save_safetensors(model: MSMoELM, path: str | Path) -> Path:
    """Write the weights under their PyTorch names, with the ``ModelConfig`` in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = to_numpy_state(model)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path),
              metadata={"format": _FORMAT, "model_config": json.dumps(model.cfg.to_dict())})
    return path


def _read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def load_safetensors(path: str | Path, cfg: ModelConfig | None = None, block_rows: int = 64) -> MSMoELM:
    """A MindSpore ``MoELM`` from a file of PyTorch-named weights (``save_safetensors``, or
    ``safetensors.torch.save_file(torch_model.state_dict(), path)`` with ``cfg`` given)."""
    from workbench.ms.model import MoELM

    state, meta = _read(path)
    if cfg is None:
        if "model_config" not in meta:
            raise ValueError(f"weights file {str(path)!r} records no model_config: pass cfg=ModelConfig(...)")
        cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
    return load_numpy_state(MoELM(cfg, block_rows=block_rows), state)


def load_torch_checkpoint(path: str | Path, block_rows: int = 64) -> MSMoELM:
    """A MindSpore ``MoELM`` from a PyTorch trainer checkpoint (``runs/<name>/ckpt-*.safetensors``)."""
    from workbench.ms.model import MoELM

    tensors, meta = _read(path)
    if "model_config" not in meta:
        raise ValueError(f"{str(path)!r} is not a workbench trainer checkpoint (no model_config in its metadata)")
    cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    return load_numpy_state(MoELM(cfg, block_rows=block_rows), state)
