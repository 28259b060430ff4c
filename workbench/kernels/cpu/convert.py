"""``convert(model)``: the fused CPU kernels swapped into a built model, by exact class.

    readable class       fused subclass           what runs as one op
    SoftmaxTopKRouter    FusedSoftmaxTopKRouter   gate, softmax, top-k and gates, forward and backward
    SwitchRouter         FusedSwitchRouter        the same (top-1, raw gates)
    SwiGLUExperts        FusedSwiGLUExperts       each thread the whole expert FFN on its rows
    MoELayer             FusedMoELayer            the Switch aux loss; the reported losses' values;
                                                  sorted dispatch: permute + experts + combine

Exact classes only: a subclass of a readable class (``CosineRouter``, or a contributor's router
with its own ``gate_logits``) is left as it is, because the kernel computes the parent's
function, not the subclass's. The swap changes a module's class and nothing else, so
parameters, buffers, state-dict keys, hooks and the optimizer's references stay as they were.
"""

from __future__ import annotations

from torch import nn

from workbench.kernels.cpu.build import enabled
from workbench.kernels.cpu.modules import (
    FusedMoELayer,
    FusedSoftmaxTopKRouter,
    FusedSwiGLUExperts,
    FusedSwitchRouter,
    fused_sorted_dispatch,
)
from workbench.moe.dispatch import sorted_dispatch
from workbench.moe.experts import SwiGLUExperts
from workbench.moe.layer import MoELayer
from workbench.moe.routers import SoftmaxTopKRouter, SwitchRouter

FUSED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    SoftmaxTopKRouter: FusedSoftmaxTopKRouter,
    SwitchRouter: FusedSwitchRouter,
    SwiGLUExperts: FusedSwiGLUExperts,
    MoELayer: FusedMoELayer,
}


def convert(model: nn.Module) -> nn.Module:
    """Swap every module of ``model`` (itself included) whose class is exactly a key of
    ``FUSED_CLASSES`` for its fused subclass, in place, and give a layer with the readable sorted
    dispatch the fused one; returns ``model``. Converting twice changes nothing."""
    for module in model.modules():
        fused = FUSED_CLASSES.get(type(module))
        if fused is not None:
            module.__class__ = fused
        if isinstance(module, FusedMoELayer) and module.dispatch is sorted_dispatch:
            module.dispatch = fused_sorted_dispatch
    return model


def convert_if_enabled(model: nn.Module) -> nn.Module:
    """``convert(model)`` unless the kernels are switched off (``WORKBENCH_FUSED_CPU=0``, or inside
    ``fused_cpu_kernel(False)``): the one guarded call a model makes when it is built."""
    return convert(model) if enabled() else model
