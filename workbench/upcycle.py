"""Sparse upcycling: a dense checkpoint becomes an MoE checkpoint that training can start from.

    model = upcycle(dense_model, workbench.preset("tiny", expert_hidden=256), method="copy")
    path  = upcycle_checkpoint("runs/dense", "runs/upcycled", cfg, method="drop", drop_ratio=0.5)

Every MoE layer's FFN is built from the dense FFN of the same layer; everything else (embeddings,
attention, norms, LM head, the layers that stay dense) is copied unchanged. Three methods:

- ``copy`` (Komatsuzaki et al. 2022, "Sparse Upcycling", arXiv:2212.05055): every expert is a
  copy of the dense FFN (``expert_hidden`` = the dense hidden size H). With gates that sum to one
  the layer computes ``sum_k g_k FFN(x) = FFN(x)``: the step-0 function is the dense one.
- ``granular`` (fine-grained experts, as Qwen1.5-MoE built its experts from Qwen-1.8B): the dense
  hidden units are split into g = H / ``expert_hidden`` slices (g = (H - S) / h beside a shared
  slice of S units) and expert e holds slice e mod g (E = g gives a pure split; E = m g gives m
  copies of every slice). SwiGLU hidden units are
  independent, so ``FFN(x) = sum_j f_j(x)`` over the slices exactly; the MoE keeps only the
  selected slices, so it equals the dense FFN only when every expert is selected (top_k = E) with
  equal gates. Otherwise it is exact only in expectation over a uniformly random selection.
- ``drop`` (Nakamura et al. 2025, "Drop-Upcycling", arXiv:2502.19261): ``copy``, then in every
  expert a fraction ``drop_ratio`` of the hidden units (chosen per expert at random) is
  re-initialised: their columns of W1 (gate) and W3 (up) and their rows of W2 (down), drawn from
  N(mean, std) of the dense matrix they replace. Experts start diverse; the layer differs from the
  dense FFN by exactly those units' contribution.

Scaling. The combine weights are ``route_scale * w`` with w summing to one over the k selected
experts for a renormalised router (``normalize_topk``; sigmoid, hash, cosine, noisy top-k and
sinkhorn too). Each routed expert's down projection W2 is multiplied by ``expert_scale =
routed_share * g_slices / route_scale`` (``g_slices`` = 1 for copy and drop), which makes the layer
the dense FFN whenever the weights w are uniform over the selected experts and every slice is covered
(copy and drop: always; granular: top_k = E), and unbiased over uniformly random selections
otherwise. With ``route_scale = E`` and top_k = E every granular gate is 1 and W2 is left as it is.
A router whose gates do not sum to one (``switch``: the raw top-1 probability, 1/E under a zero
router; ``normalize_topk=False``; ``expert_choice``; ``soft_moe``, which mixes tokens) does not
give the dense function; ``step0_statement`` says which case a config is in.

Shared expert (``shared_expert=True``, ``num_shared_experts=1`` in the config): for copy and drop
the shared expert is one more copy of the dense FFN, and the dense output is split half and half
between it and the routed experts (both W2 halved; a Qwen2-MoE shared gate, zero-initialised, is
sigmoid(0) = 1/2 already, so the shared copy keeps W2 whole). For granular the shared expert
holds the first ``shared_hidden`` dense units whole and the routed slices split the rest.

Router init: ``zero`` (every logit 0: uniform gates, and every token ties, so top-k takes the
same experts for all tokens at step 0) or ``small`` (N(0, 1e-3^2), the default: near-uniform
gates that differ per token, as a router trained from scratch starts). ``noise`` adds
``noise * std(W) * N(0, 1)`` to every routed expert matrix, std(W) that of the dense matrix it came
from. A capacity dispatch drops tokens (a zero router sends them all to the same experts), so
``step0_statement`` calls it not exact; the default dispatch (``sorted``) is dropless.

``upcycle_checkpoint`` writes the model as a step-0 run checkpoint (``workbench.train.checkpoint``'s
format) with an ``upcycle`` metadata entry: the dense source, the method, its parameters, the
scales and the step-0 statement. ``workbench.load_model`` and ``TrainConfig.init_from`` read it.

Shape legend: D model dim, H dense hidden, h expert hidden, S shared hidden, E experts.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.validation import check, check_choice

__all__ = ["METHODS", "ROUTER_INITS", "SMALL_ROUTER_STD", "UpcycleReport", "read_dense", "read_upcycle_metadata",
           "step0_statement", "upcycle", "upcycle_checkpoint", "upcycle_with_report", "upcycled_config",
           "upcycled_path"]

METHODS = ("copy", "granular", "drop")
ROUTER_INITS = ("zero", "small")
SMALL_ROUTER_STD = 1e-3
_CKPT_NAME = re.compile(r"^ckpt-\d{8}\.safetensors$")
# ModelConfig fields that must agree between the dense source and the MoE model for the copied
# tensors to mean the same function (seq_len and dropout may change: they hold no weights)
MATCHING_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "rope_base", "norm_eps", "tie_embeddings")
# routers whose combine weights are a renormalised distribution over the selected experts when
# normalize_topk is on (or their default): the copy method is exact for them
_RENORMALISED = ("softmax_topk", "sigmoid", "noisy_topk", "hash", "sinkhorn", "cosine", "uniform", "random")


@dataclass
class UpcycleReport:
    """What ``upcycle_with_report`` did: the method, its parameters, the scales it applied and,
    for Drop-Upcycling, the re-initialised hidden units of every expert."""

    method: str
    router_init: str
    noise: float
    drop_ratio: float
    shared_expert: bool
    seed: int
    dense_hidden: int
    expert_scale: float  # routed experts' W2 multiplier
    shared_scale: float  # shared expert's W2 multiplier (0 when there is none)
    slices: int  # g: dense hidden slices (1 for copy and drop)
    step0: str  # step0_statement
    # (layer index, expert) -> sorted hidden-unit indices re-initialised (drop only)
    reinitialised: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False)
    source: dict[str, Any] = field(default_factory=dict)  # the dense checkpoint, when there was one

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for a checkpoint's metadata (the per-expert unit lists summarised as counts)."""
        d = asdict(self)
        d["reinitialised_per_expert"] = sorted({len(v) for v in self.reinitialised.values()})
        del d["reinitialised"]
        return d


# --- configs ------------------------------------------------------------------------------


def _check_options(method: str, router_init: str, noise: float, drop_ratio: float) -> None:
    check_choice("method", method, METHODS)
    check_choice("router_init", router_init, ROUTER_INITS)
    check(isinstance(noise, int | float) and not isinstance(noise, bool) and math.isfinite(noise) and noise >= 0,
          "noise", "must be a finite number >= 0 (a multiple of each dense matrix's std)", noise)
    check(isinstance(drop_ratio, int | float) and not isinstance(drop_ratio, bool) and 0 <= drop_ratio <= 1,
          "drop_ratio", "must be in [0, 1] (the fraction of each expert's hidden units re-initialised)", drop_ratio)


def upcycled_config(dense: ModelConfig, moe: ModelConfig, method: str = "copy", *, shared_expert: bool = False,
                    given: set[str] | frozenset[str] = frozenset()) -> ModelConfig:
    """``moe`` with the fields the method fixes filled from the dense config, unless in ``given``
    (the MoE fields the caller chose): ``dense_hidden`` = H, ``expert_hidden`` (copy/drop: H;
    granular: H / E, or (H - S) / E with a shared slice S = h), and the shared expert
    (``num_shared_experts=1``, ``shared_expert_hidden``: H for copy/drop, h for granular).
    The CLI builds its config this way; ``upcycle`` then checks it."""
    check_choice("method", method, METHODS)
    H = dense.dense_hidden
    check(moe.moe is not None, "moe", "the target config must have MoE layers", None)
    m = moe.moe
    changes: dict[str, Any] = {}
    if shared_expert and "num_shared_experts" not in given:
        changes["num_shared_experts"] = 1
    if method in ("copy", "drop"):
        if "expert_hidden" not in given:
            changes["expert_hidden"] = H
        if shared_expert and "shared_expert_hidden" not in given:
            changes["shared_expert_hidden"] = H
    elif "expert_hidden" not in given:
        parts = m.num_experts + (1 if shared_expert else 0)
        check(H % parts == 0, "moe.num_experts", f"granular upcycling splits the dense hidden size {H} into "
              f"{parts} equal parts ({m.num_experts} experts{' + 1 shared' if shared_expert else ''}): it must "
              f"divide {H} (or give expert_hidden)", m.num_experts)
        changes["expert_hidden"] = H // parts
        if shared_expert and "shared_expert_hidden" not in given:
            changes["shared_expert_hidden"] = H // parts
    moe_cfg = type(m)(**{**asdict(m), **changes})
    return moe.replace(moe=moe_cfg, dense_hidden=moe.dense_hidden if "dense_hidden" in given else H)


def _slices(cfg: ModelConfig, method: str, H: int, shared_expert: bool) -> tuple[int, int]:
    """(g slices of the routed part, S shared hidden units), after checking that the config fits
    the method; ``ValueError`` names the field."""
    m = cfg.moe
    h, S = m.expert_hidden, m.shared_hidden
    if shared_expert:
        check(m.num_shared_experts == 1, "moe.num_shared_experts", "shared_expert=True keeps one shared expert: "
              "must be 1", m.num_shared_experts)
    else:
        check(m.num_shared_experts == 0, "moe.num_shared_experts", "the config has shared experts: pass "
              "shared_expert=True (and num_shared_experts=1) to fill one from the dense FFN", m.num_shared_experts)
    if method in ("copy", "drop"):
        check(h == H, "moe.expert_hidden", f"method={method!r} copies the dense FFN into every expert: must "
              f"equal the dense hidden size {H}", h)
        if shared_expert:
            check(S == H, "moe.shared_expert_hidden", f"method={method!r} makes the shared expert a copy of the "
                  f"dense FFN: must equal the dense hidden size {H}", S)
        return 1, 0
    check(0 <= S < H, "moe.shared_expert_hidden", f"the shared slice must leave units of the dense hidden size "
          f"{H} to the routed experts", S)
    check((H - S) % h == 0, "moe.expert_hidden", f"granular upcycling cuts the {H - S} routed dense hidden units "
          "into slices of expert_hidden units: must divide it", h)
    g = (H - S) // h
    check(m.num_experts % g == 0, "moe.num_experts", f"granular upcycling gives {g} slices of {h} units; every "
          f"slice must be held by the same number of experts, so num_experts must be a multiple of {g}",
          m.num_experts)
    return g, S


def step0_statement(cfg: ModelConfig, method: str = "copy", router_init: str = "small", noise: float = 0.0,
                    drop_ratio: float = 0.5) -> str:
    """Whether the upcycled model computes the dense model's function at step 0, and why: one
    sentence starting with ``exact`` or ``not exact``."""
    m = cfg.moe
    name = m.router
    default_norm = {"switch": False, "expert_choice": False, "soft_moe": False}.get(name, True)
    norm = default_norm if m.normalize_topk is None else m.normalize_topk
    if noise > 0:
        return f"not exact: noise={noise:g} perturbs every routed expert"
    if method == "drop" and drop_ratio > 0:
        return (f"not exact: Drop-Upcycling re-initialises {drop_ratio:g} of every expert's hidden units; the output "
                "differs by exactly their contribution")
    if m.dispatch == "capacity" and m.capacity_factor is not None and name != "soft_moe":
        return (f"not exact: dispatch='capacity' (capacity_factor={m.capacity_factor:g}) drops the tokens past an "
                "expert's capacity (a zero router sends every token to the same experts); a dropless dispatch "
                "(sorted, loop) or capacity_factor=None keeps them")
    if name == "soft_moe":
        return "not exact: soft_moe feeds experts weighted averages of tokens, and the experts are not linear"
    if name == "expert_choice" and m.expert_choice_eval != "token_choice":
        return ("not exact: expert_choice gives a token 0 to E experts with their raw probabilities as gates, "
                "which do not sum to one")
    if not norm:
        zero = (f" (under router_init='zero' every probability is 1/E, so the routed output is "
                f"{m.top_k}/{m.num_experts} of the dense FFN's)" if router_init == "zero" and name != "sigmoid" else "")
        return (f"not exact: router={name!r} gates with raw {'top-1 ' if m.top_k == 1 else ''}"
                f"{'affinities' if name == 'sigmoid' else 'probabilities'}, which do not sum to one{zero}")
    if method in ("copy", "drop"):
        return (f"exact: every expert is the dense FFN and router={name!r} renormalises its gates to sum to one "
                "(route_scale divided out of W2), in a dropless dispatch")
    if m.top_k == m.num_experts and router_init == "zero":
        return (f"exact: top_k = num_experts = {m.num_experts} selects every slice and router_init='zero' makes the "
                "renormalised gates uniform (1/E each, times route_scale, matched by W2's scale)")
    if m.top_k == m.num_experts:
        return (f"not exact: top_k = num_experts selects every slice, but router_init={router_init!r} makes the "
                "gates only nearly uniform (router_init='zero' makes it exact)")
    return (f"not exact: top_k={m.top_k} < num_experts={m.num_experts} keeps {m.top_k} of the "
            f"{m.num_experts} experts' slices per token: the dense FFN only in expectation over a uniformly "
            "random selection")


# --- the dense source ----------------------------------------------------------------------


def _dense_state(dense: nn.Module | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ModelConfig | None]:
    if isinstance(dense, nn.Module):
        cfg = getattr(dense, "cfg", None)
        if isinstance(cfg, ModelConfig) and cfg.moe is not None:
            raise ValueError(f"the source model is not dense (moe.router={cfg.moe.router!r}, "
                             f"num_experts={cfg.moe.num_experts}): upcycle takes a dense model "
                             "(ModelConfig(moe=None), `workbench train --dense`)")
        return {k: v.detach().cpu() for k, v in dense.state_dict().items()}, cfg
    if isinstance(dense, dict):
        # _DenseState carries its checkpoint's config; the MoE model is built on the CPU
        bad = next((k for k, v in dense.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"dense state entry {bad!r} is a {type(dense[bad]).__name__}, not a tensor")
        return {k: v.detach().cpu() for k, v in dense.items()}, getattr(dense, "cfg", None)
    raise ValueError(f"dense_model_or_state must be a dense MoELM or its state dict, got {type(dense).__name__}")


def _check_dense(state: dict[str, torch.Tensor], dense_cfg: ModelConfig | None, cfg: ModelConfig) -> int:
    """The dense hidden size H, after checking that ``state`` is a dense model of ``cfg``'s shape;
    ``ValueError`` naming the config field or the tensor that disagrees."""
    if dense_cfg is not None:
        for name in MATCHING_FIELDS:
            ours, theirs = getattr(cfg, name), getattr(dense_cfg, name)
            check(ours == theirs, name, f"the dense model has {name}={theirs!r}: the MoE config must match it", ours)
    moe_keys = sorted(k for k in state if ".ffn.router." in k or ".ffn.experts." in k)
    if moe_keys:
        raise ValueError(f"tensor {moe_keys[0]!r} is an MoE layer's: the source is not a dense model "
                         "(upcycle takes a dense one, `workbench train --dense`)")
    first = "blocks.0.ffn.w1.weight"
    if first not in state:
        raise ValueError(f"tensor {first!r} is missing from the dense state: not a workbench dense model")
    H = int(state[first].shape[0])
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        want = {k: tuple(v.shape) for k, v in _model(cfg.replace(moe=None, dense_hidden=H)).state_dict().items()}
    for k in sorted(want):
        if k not in state:
            raise ValueError(f"tensor {k!r} is missing from the dense state (the MoE config has n_layers="
                             f"{cfg.n_layers}, tie_embeddings={cfg.tie_embeddings})")
        got = tuple(state[k].shape)
        if got != want[k]:
            raise ValueError(f"dense tensor {k!r} has shape {got}, the MoE config (d_model={cfg.d_model}, "
                             f"vocab_size={cfg.vocab_size}, dense hidden {H}) needs {want[k]}")
    extra = sorted(set(state) - set(want))
    if extra:
        raise ValueError(f"tensor {extra[0]!r} is not part of a dense model of the MoE config's shape "
                         f"(n_layers={cfg.n_layers})")
    return H


def _model(cfg: ModelConfig) -> nn.Module:
    from workbench.model import MoELM

    return MoELM(cfg)


# --- the upcycling -------------------------------------------------------------------------


def upcycle(dense_model_or_state: nn.Module | dict[str, torch.Tensor], moe_config: ModelConfig, *,
            method: str = "copy", router_init: str = "small", noise: float = 0.0, drop_ratio: float = 0.5,
            shared_expert: bool = False, seed: int = 0) -> nn.Module:
    """The MoE model (``MoELM`` of ``moe_config``, on the CPU, in evaluation mode) upcycled from a dense
    ``MoELM`` or its state dict. See the module docstring for the methods and scales; every bad
    input is a ``ValueError`` naming the field or tensor."""
    return upcycle_with_report(dense_model_or_state, moe_config, method=method, router_init=router_init,
                               noise=noise, drop_ratio=drop_ratio, shared_expert=shared_expert, seed=seed)[0]


@torch.no_grad()
def upcycle_with_report(dense_model_or_state: nn.Module | dict[str, torch.Tensor], moe_config: ModelConfig, *,
                        method: str = "copy", router_init: str = "small", noise: float = 0.0,
                        drop_ratio: float = 0.5, shared_expert: bool = False,
                        seed: int = 0) -> tuple[nn.Module, UpcycleReport]:
    """``upcycle``, and the ``UpcycleReport`` of what it did (scales, re-initialised units)."""
    _check_options(method, router_init, noise, drop_ratio)
    check(isinstance(moe_config, ModelConfig) and moe_config.moe is not None, "moe_config",
          "must be a ModelConfig with MoE layers (moe is not None)", type(moe_config).__name__)
    cfg = moe_config
    state, dense_cfg = _dense_state(dense_model_or_state)
    H = _check_dense(state, dense_cfg, cfg)
    if len(cfg.moe_layers) < cfg.n_layers:
        check(cfg.dense_hidden == H, "dense_hidden", f"the MoE model keeps dense layers, copied from the dense "
              f"model's FFN: must equal its hidden size {H}", cfg.dense_hidden)
    g, S = _slices(cfg, method, H, shared_expert)
    m = cfg.moe
    h = m.expert_hidden
    shared_gate0 = 0.5 if m.shared_expert_gate else 1.0  # sigmoid(0 . x): the zero-initialised gate
    if method == "granular":
        routed_share, shared_scale = 1.0, (1.0 / shared_gate0 if shared_expert else 0.0)
    else:
        routed_share = 0.5 if shared_expert else 1.0
        shared_scale = 0.5 / shared_gate0 if shared_expert else 0.0
    expert_scale = routed_share * g / m.route_scale

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a router's causality warning: the config chose it
        torch.manual_seed(seed)  # the hash router's table and the parameters not set below
        model = _model(cfg)
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    reinit: dict[tuple[int, int], list[int]] = {}
    for key in target:
        if key in state and not (".ffn." in key and int(key.split(".")[1]) in cfg.moe_layers):
            new[key] = state[key].to(target[key].dtype)
    for i in cfg.moe_layers:
        p = f"blocks.{i}.ffn."
        # dense SwiGLU, nn.Linear layout: w1, w3 (H, D), w2 (D, H); experts take (D, h) and (h, D)
        w1_HD, w3_HD, w2_DH = (state[f"blocks.{i}.ffn.{w}.weight"].float() for w in ("w1", "w3", "w2"))
        if shared_expert:
            units = slice(0, S) if method == "granular" else slice(0, H)
            new[p + "shared_experts.w1.weight"] = w1_HD[units].clone()
            new[p + "shared_experts.w3.weight"] = w3_HD[units].clone()
            new[p + "shared_experts.w2.weight"] = w2_DH[:, units] * shared_scale
            if m.shared_expert_gate:
                new[p + "shared_gate.weight"] = torch.zeros_like(target[p + "shared_gate.weight"])
        w1s, w3s, w2s = [], [], []
        for e in range(m.num_experts):
            start = S + (e % g) * h if method == "granular" else 0
            w1_Dh = w1_HD[start:start + h].t().clone()
            w3_Dh = w3_HD[start:start + h].t().clone()
            w2_hD = w2_DH[:, start:start + h].t().clone()
            if method == "drop":
                n = round(drop_ratio * h)
                units = torch.randperm(h, generator=gen)[:n].sort().values
                reinit[(i, e)] = units.tolist()
                # Drop-Upcycling: re-drawn from N(mean, std) of the dense matrix each replaces
                w1_Dh[:, units] = _like(w1_HD, (w1_Dh.shape[0], n), gen)
                w3_Dh[:, units] = _like(w3_HD, (w3_Dh.shape[0], n), gen)
                w2_hD[units] = _like(w2_DH, (n, w2_hD.shape[1]), gen)
            w2_hD = w2_hD * expert_scale
            if noise > 0:
                w1_Dh += noise * w1_HD.std() * torch.randn(w1_Dh.shape, generator=gen)
                w3_Dh += noise * w3_HD.std() * torch.randn(w3_Dh.shape, generator=gen)
                w2_hD += noise * (w2_DH.std() * expert_scale) * torch.randn(w2_hD.shape, generator=gen)
            w1s.append(w1_Dh)
            w3s.append(w3_Dh)
            w2s.append(w2_hD)
        new[p + "experts.w1"] = torch.stack(w1s)
        new[p + "experts.w3"] = torch.stack(w3s)
        new[p + "experts.w2"] = torch.stack(w2s)
        for key in target:
            if key.startswith(p + "router."):
                new[key] = _router_tensor(key, target[key], router_init, gen)
    for key, value in target.items():
        new.setdefault(key, value)  # the hash table, loss-free bias: as the seeded model built them
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in new.items()}, strict=True)
    report = UpcycleReport(method, router_init, float(noise), float(drop_ratio), shared_expert, seed, H,
                           expert_scale, shared_scale, g, step0_statement(cfg, method, router_init, noise, drop_ratio),
                           reinit)
    return model.eval(), report


def _like(w: torch.Tensor, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Fresh weights with the mean and std of the dense matrix ``w`` (Drop-Upcycling, section 3)."""
    return w.mean() + w.std() * torch.randn(shape, generator=gen)


def _router_tensor(key: str, built: torch.Tensor, router_init: str, gen: torch.Generator) -> torch.Tensor:
    """The router's input projection (and noisy top-k's noise projection) zero or N(0, 1e-3^2);
    buffers (hash table, balancing bias) and the cosine router's expert embeddings and temperature
    as the router builds them (only the projection's scale matters before a normalisation)."""
    name = key.rsplit(".", 1)[1]
    if name == "weight":
        if router_init == "zero":
            return torch.zeros_like(built)
        return SMALL_ROUTER_STD * torch.randn(built.shape, generator=gen)
    if name == "noise_weight":
        return torch.zeros_like(built)
    return built


# --- checkpoints ---------------------------------------------------------------------------


def upcycled_path(out: str | Path) -> Path:
    """Where ``upcycle_checkpoint`` writes: ``out`` itself when it names a ``.safetensors`` file,
    else ``out/ckpt-00000000.safetensors`` (a run directory at step 0, which ``load_model`` and
    the trainer's ``--init-from`` read like any run's)."""
    from workbench.train.checkpoint import checkpoint_path

    out = Path(out).expanduser()
    return out if out.suffix == ".safetensors" else checkpoint_path(out, 0)


def read_dense(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path, dict[str, Any]]:
    """(config, model state, checkpoint file, metadata facts) of a dense run directory (its newest
    usable checkpoint) or checkpoint file; ``ValueError`` when it is unusable or not dense."""
    from workbench.train.checkpoint import CheckpointError, latest_usable_checkpoint, list_checkpoints, load_checkpoint
    from workbench.train.rundir import read_run_info

    path = Path(path).expanduser()
    try:
        if path.is_dir():
            if not list_checkpoints(path):
                raise ValueError(f"{path} holds no checkpoint (ckpt-<step>.safetensors): not a run directory")
            ckpt, skipped = latest_usable_checkpoint(path, read_run_info(path))
            if ckpt is None:
                raise ValueError(f"no usable checkpoint in {path}: {'; '.join(skipped)}")
        elif path.exists():
            ckpt = load_checkpoint(path)
        else:
            raise ValueError(f"{path} does not exist: give a dense run directory or one of its checkpoint files")
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    cfg = ModelConfig.from_dict(ckpt.model_config)
    if cfg.moe is not None:
        raise ValueError(f"checkpoint {ckpt.path} is not dense (moe.router={cfg.moe.router!r}, num_experts="
                         f"{cfg.moe.num_experts}): upcycle takes a dense run (`workbench train --dense`)")
    return cfg, ckpt.model_state, Path(ckpt.path), {"path": str(Path(ckpt.path).resolve()), "step": ckpt.step}


def upcycle_checkpoint(dense_path: str | Path, out_path_or_run_dir: str | Path, moe_config: ModelConfig, *,
                       overwrite: bool = False, **options: Any) -> Path:
    """Upcycle the dense run (directory) or checkpoint file ``dense_path`` and write the MoE model
    as a step-0 workbench checkpoint: ``out_path_or_run_dir`` itself when it ends in
    ``.safetensors``, else ``<dir>/ckpt-00000000.safetensors``. ``options`` are ``upcycle``'s.

    The file has a run checkpoint's format (``workbench.train.checkpoint``: model tensors under
    ``model/``, SHA-256, both configs, RNG state; no optimizer state), written atomically, plus an
    ``upcycle`` metadata entry: the source checkpoint and step, the method, its parameters, scales
    and the step-0 statement. ``workbench.load_model`` loads it. An existing file is refused
    unless ``overwrite``; so is a folder that holds a run."""
    dense_cfg, state, _, source = read_dense(dense_path)
    model, report = upcycle_with_report(_DenseState(state, dense_cfg), moe_config, **options)
    report.source = source
    out = upcycled_path(out_path_or_run_dir)
    _refuse_existing(out, overwrite)
    _write(out, model, moe_config, report)
    return out


class _DenseState(dict):
    """A dense state dict that carries its config, so that ``upcycle`` compares the fields too."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: ModelConfig):
        super().__init__(state)
        self.cfg = cfg


def _refuse_existing(out: Path, overwrite: bool) -> None:
    from workbench.train.checkpoint import list_checkpoints
    from workbench.train.rundir import RUN_FILE

    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
    folder = out.parent
    # a run's checkpoint name in a run's folder would become that run's newest checkpoint; a file of
    # another name beside a run (runs/dense/moe.safetensors) is not the run's
    if _CKPT_NAME.match(out.name) and ((folder / RUN_FILE).exists()
                                       or any(p != out for _, p in list_checkpoints(folder))):
        raise ValueError(f"{folder} holds a training run: write the upcycled checkpoint to a new folder, or to a "
                         "file of another name than ckpt-<step>.safetensors")


def _write(out: Path, model: nn.Module, cfg: ModelConfig, report: UpcycleReport) -> None:
    from workbench.train.checkpoint import FORMAT, CheckpointError, capture_rng_state, tensors_digest, write_atomically
    from workbench.train.config import TrainConfig

    tensors = {f"model/{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    rng = capture_rng_state()
    tensors["rng/torch"] = rng["torch"]
    metadata = {
        "format": FORMAT,
        "tensors_sha256": tensors_digest(tensors),
        "step": "0",
        "data_position": "0",
        "model_config": json.dumps(cfg.to_dict()),
        "train_config": json.dumps(TrainConfig().to_dict()),  # none trained it; the defaults keep the format
        "optimizer": json.dumps({"param_groups": [], "scalars": {}}),
        "scheduler": json.dumps({}),
        "rng_python": json.dumps(rng["python"]),
        "upcycle": json.dumps(report.to_dict()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(tensors, metadata, out)
    except OSError as err:
        raise CheckpointError(f"could not write {out}: {err.strerror or err}") from err


def read_upcycle_metadata(path: str | Path) -> dict[str, Any] | None:
    """The ``upcycle`` entry of a checkpoint's metadata (None for a checkpoint not upcycled)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        value = (f.metadata() or {}).get("upcycle")
    return None if value is None else json.loads(value)
