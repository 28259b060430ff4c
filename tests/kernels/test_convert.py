"""``convert(model)`` computes what the readable model computes, and converts nothing it does not know.

A converted model against a copy left readable: logits, losses, the routing and every parameter's
gradient (fp32: 1e-5 for values, 1e-4 relative for gradients), for the routers, dispatches and
losses the fused subclasses touch. Then the trap the exact-class map closes: a subclass of a
converted class with its own code (a router with its own ``gate_logits``) keeps that code, so
kernels on and off give the same outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.conftest import needs_kernel
from workbench.config import preset
from workbench.kernels import cpu as cpu_kernels
from workbench.kernels.cpu import FUSED_CLASSES, convert
from workbench.kernels.cpu.modules import FusedMoELayer, fused_sorted_dispatch
from workbench.model import MoELM
from workbench.moe import ROUTERS, MoELayer, SwiGLUExperts
from workbench.moe.dispatch import sorted_dispatch
from workbench.moe.routers import SoftmaxTopKRouter, SwitchRouter

pytestmark = [needs_kernel, pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")]

MODELS = {
    "tiny (softmax top-2, sorted)": {},
    "switch, capacity, every loss weighted": dict(router="switch", top_k=1, dispatch="capacity",
                                                  seq_aux_loss_weight=0.01, z_loss_weight=1e-3),
    "loss-free bias, shared expert, losses only reported": dict(bias_update_rate=1e-2, num_shared_experts=1,
                                                                aux_loss_weight=0.0),
    "global-batch aux loss": dict(aux_loss_scope="global_batch", z_loss_weight=1e-3),
    "sigmoid router (not converted), sorted": dict(router="sigmoid"),
    "expert choice (padded slots), sorted": dict(router="expert_choice"),
}


def readable_model(**moe_fields) -> MoELM:
    cfg = preset("tiny")
    cfg = cfg.replace(moe=type(cfg.moe)(**{**cfg.moe.__dict__, **moe_fields}))
    torch.manual_seed(0)
    with cpu_kernels.fused_cpu_kernel(False):
        return MoELM(cfg).train()


def forward_backward(model: MoELM, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    row = {"logits": out.logits.detach(), "loss": out.loss.detach()}
    for i, info in enumerate(out.routing):
        row |= {f"L{i}/{name}": value.detach() for name, value in info.losses.items()}
        row[f"L{i}/expert_ids (sorted per token)"] = info.router_output.expert_ids_TK.sort(dim=1).values
        row[f"L{i}/tokens_per_expert"] = info.tokens_per_expert
    return row | {f"grad/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", MODELS, ids=list(MODELS))
def test_a_converted_model_computes_what_the_readable_model_computes(case):
    model = readable_model(**MODELS[case])
    fused = convert(copy.deepcopy(model))
    assert any(type(m) in FUSED_CLASSES.values() for m in fused.modules())
    tokens = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(1))
    got, want = forward_backward(fused, tokens), forward_backward(model, tokens)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(got[name], value), name
        else:
            tol = 1e-4 if name.startswith("grad/") else 1e-5
            torch.testing.assert_close(got[name], value, rtol=tol, atol=tol * value.abs().max().item(), msg=name)


def test_convert_swaps_classes_only_and_keeps_parameters_buffers_and_keys():
    model = readable_model()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    assert convert(model) is model
    assert [type(m) for m in model.modules()] == [FUSED_CLASSES.get(c, c) for c in classes]
    assert dict(model.named_parameters()) == params  # the same tensor objects: an optimizer keeps working
    assert dict(model.named_buffers()) == buffers
    assert list(model.state_dict()) == keys
    layer = model.moe_layers()[0]
    assert type(layer) is FusedMoELayer and layer.dispatch is fused_sorted_dispatch
    convert(model)  # twice: nothing changes
    assert [type(m) for m in model.modules()] == [FUSED_CLASSES.get(c, c) for c in classes]


def test_the_model_is_converted_when_built_unless_switched_off():
    cfg = preset("tiny")
    with cpu_kernels.fused_cpu_kernel(True):
        assert type(MoELM(cfg).moe_layers()[0]) is FusedMoELayer
    with cpu_kernels.fused_cpu_kernel(False):
        layer = MoELM(cfg).moe_layers()[0]
        assert type(layer) is MoELayer and layer.dispatch is sorted_dispatch


# --- subclasses keep their own code -----------------------------------------------------------


class SharpenedRouter(SoftmaxTopKRouter):
    """A contributor's four-line router: the parent's selection on logits of its own."""

    def gate_logits(self, x32_TD):
        return 3.0 * F.linear(x32_TD, self.weight.float()) + 1.0


class SharpenedSwitch(SwitchRouter):
    def gate_logits(self, x32_TD):
        return -2.0 * F.linear(x32_TD, self.weight.float())


class LeakyExperts(SwiGLUExperts):
    def forward_grouped(self, x_ND, counts):
        return super().forward_grouped(x_ND, counts) + 0.5 * x_ND


class HalfLossLayer(MoELayer):
    def balance_loss(self, name, inputs):
        return 0.5 * super().balance_loss(name, inputs)


def layer_with(router_class=None, experts_class=None, layer_class=MoELayer, **moe_fields) -> MoELayer:
    cfg = type(preset("tiny").moe)(**{**preset("tiny").moe.__dict__, "z_loss_weight": 1e-3, **moe_fields})
    torch.manual_seed(0)
    layer = layer_class(48, cfg).train()
    if router_class is not None:
        layer.router.__class__ = router_class  # the subclass adds no state: same parameters
    if experts_class is not None:
        layer.experts.__class__ = experts_class
    return layer


def layer_outputs(layer: MoELayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y, info = layer(x)
    ((y * 0.3).sum() + info.weighted_loss).backward()
    r = info.router_output
    return {"y": y.detach(), "x.grad": x.grad, "logits": r.logits_TE.detach(), "gates": r.weights_TK.detach(),
            "aux_loss": info.losses["aux_loss"].detach(), "router.grad": layer.router.weight.grad}


SUBCLASSES = {
    "softmax top-k router with its own gate_logits": dict(router_class=SharpenedRouter),
    "switch router with its own gate_logits": dict(router_class=SharpenedSwitch, router="switch", top_k=1),
    "experts with their own forward_grouped": dict(experts_class=LeakyExperts),
    "layer with its own balance_loss": dict(layer_class=HalfLossLayer),
}


@pytest.mark.parametrize("case", SUBCLASSES, ids=list(SUBCLASSES))
def test_a_subclass_of_a_converted_class_gives_the_same_outputs_with_kernels_on_and_off(case):
    layer = layer_with(**SUBCLASSES[case])
    parent = layer_with(**{k: v for k, v in SUBCLASSES[case].items() if not k.endswith("_class")})
    subclassed = [m for m in layer.modules() if type(m) not in FUSED_CLASSES and isinstance(m, tuple(FUSED_CLASSES))]
    assert subclassed, "the case has no subclass of a converted class"
    fused = convert(copy.deepcopy(layer))
    for module in fused.modules():
        if type(module).__name__ in ("SharpenedRouter", "SharpenedSwitch", "LeakyExperts", "HalfLossLayer"):
            continue
        assert type(module) not in FUSED_CLASSES  # everything else was converted
    x = torch.randn(2, 40, 48)
    on, off, parents = layer_outputs(fused, x), layer_outputs(layer, x), layer_outputs(parent, x)
    for name, value in off.items():
        torch.testing.assert_close(on[name], value, rtol=1e-4, atol=1e-5 * max(1.0, value.abs().max().item()),
                                   msg=name)
    # the subclass's code really ran: its outputs are not its parent's
    assert any(not torch.allclose(off[name], parents[name]) for name in ("y", "logits", "aux_loss"))


def test_every_router_a_class_map_names_is_registered_and_exact():
    """The map's keys are the readable classes themselves (exact classes), and its routers are registry routers."""
    for readable, fused in FUSED_CLASSES.items():
        assert fused.__mro__[1:].count(readable) == 1 and issubclass(fused, readable)
    routers = [c for c in FUSED_CLASSES if c in ROUTERS.values()]
    assert set(routers) == {ROUTERS["softmax_topk"], ROUTERS["switch"]}
    assert ROUTERS["cosine"] not in FUSED_CLASSES  # a SoftmaxTopKRouter subclass with its own gate
