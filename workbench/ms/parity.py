"""Parity of the MindSpore model with the PyTorch reference: operator by operator, then end to end.

    report = run_parity(preset("tiny"), mode="pynative")
    print(report.format()); report.passed

Every check feeds the same random inputs and the same weights (``workbench.ms.convert``) to both
frameworks and compares the outputs, and the gradients where an operator has any, in fp32:

- operators: embedding, RMSNorm, RoPE, causal attention, the router (logits, scores, gates and the
  selected experts), the SwiGLU experts, dispatch + combine (the MoE layer's output), each
  balancing loss (Switch aux, sequence-wise, z-loss) and the loss-free bias update;
- end to end: logits, loss, the gradient of every parameter, one AdamW step (the parameter
  updates), and a loss curve of ``curve_steps`` training steps (50 by default) from the same
  initial weights on the same batches (``MSTrainer`` against ``workbench.train.Trainer``).

Errors. ``max_abs`` = max |ms - torch|; ``max_rel`` = max_abs / max |torch| (relative to the
reference's largest entry: elementwise relative error is meaningless on entries near zero; for a
scalar it is the plain relative error). Tolerances (``TOLERANCES``, on ``max_rel``): forward values
1e-5 (logits and loss included); gradients, and AdamW's updates from the same gradients, 1e-4;
the parameters after one whole training step in each framework 1e-3. The latter is looser for a
stated reason, not tuned to pass: AdamW's first step is about lr * g / (|g| + eps), so a gradient
entry near eps = 1e-8 turns a 1e-9 gradient difference into a change of its update of order lr (3e-3).

The loss curve. Training amplifies any difference, rounding included: at the workbench's learning
rate a 1e-7 difference grows to percent level within a few dozen steps, in one framework as much as
between two. So the curve is judged against a control run: PyTorch against itself, from initial
weights multiplied by 1 + 1e-7 N(0, 1) (``CONTROL_NOISE``, the size of fp32 rounding). The curve
passes when the largest relative difference between MindSpore and PyTorch is at most 1e-3 or at
most ``CONTROL_FACTOR`` = 3 times the control's: differences that rounding alone produces.

Expert selection. Per MoE layer, the share of tokens whose set of K experts is the same in both
frameworks. A disagreement is a *near tie* when, in the PyTorch reference, the K-th and (K+1)-th
highest ranking scores (probability or affinity, plus the loss-free bias where there is one) differ
by at most ``NEAR_TIE`` = 1e-5: there the order is decided by rounding (the scores themselves
agree to about 1e-7). Selection passes when every disagreement is a near tie.

``mode`` ("pynative" or "graph") is how the MindSpore side runs: in GRAPH mode every MindSpore
function below is compiled with ``mindspore.jit`` before it is called.

Generation (inference) parity lives beside the MindSpore decode it checks:
``workbench.ms.generate.generation_parity`` greedy-decodes the same prompts with a KV cache in both
frameworks and reports, per prompt, equal tokens or the first step where they differ and whether
it was a near tie of the logits (``workbench parity --generate``).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.config import ModelConfig
from workbench.ms._import import require_mindspore
from workbench.validation import check_choice

ms = require_mindspore()
import torch  # noqa: E402
from mindspore import Parameter, Tensor, ops  # noqa: E402

from workbench.ms import model as msm  # noqa: E402
from workbench.ms.convert import from_torch, load_numpy_state, torch_state_numpy  # noqa: E402

TOLERANCES = {"forward": 1e-5, "gradient": 1e-4, "update": 1e-4, "step": 1e-3, "curve": 1e-3}
CONTROL_NOISE = 1e-7  # relative perturbation of the control run's initial weights: fp32 rounding
CONTROL_FACTOR = 3.0  # the curve may differ by this times the control's difference
NEAR_TIE = 1e-5
MODES = ("pynative", "graph")


@dataclass
class Check:
    """One compared quantity."""

    operator: str
    quantity: str  # "forward", "grad x", "grad weight", ...
    kind: str  # a key of TOLERANCES
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.max_rel <= self.tolerance)


@dataclass
class Selection:
    """Expert-selection agreement of one MoE layer."""

    layer: int
    tokens: int
    agree: int
    near_ties: int  # disagreements at a near tie (see the module docstring)
    min_gap: float  # the smallest K-th vs (K+1)-th score gap in the reference, over all tokens

    @property
    def disagree(self) -> int:
        return self.tokens - self.agree

    @property
    def agreement(self) -> float:
        return self.agree / max(1, self.tokens)

    @property
    def passed(self) -> bool:
        return self.disagree == self.near_ties


@dataclass
class ParityReport:
    config: dict[str, Any]
    mode: str
    checks: list[Check] = field(default_factory=list)
    selection: list[Selection] = field(default_factory=list)
    curve: dict[str, list[float]] = field(default_factory=dict)  # "torch", "mindspore": loss per step

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(s.passed for s in self.selection)

    def table(self) -> list[dict[str, Any]]:
        """One row per check (for a DataFrame)."""
        return [{"operator": c.operator, "quantity": c.quantity, "max_abs": c.max_abs, "max_rel": c.max_rel,
                 "tolerance": c.tolerance, "passed": c.passed} for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "mode": self.mode, "passed": self.passed, "tolerances": TOLERANCES,
                "near_tie": NEAR_TIE, "checks": self.table(),
                "selection": [dict(dataclasses.asdict(s), agreement=s.agreement, passed=s.passed)
                              for s in self.selection],
                "curve": self.curve}

    def format(self) -> str:
        lines = [f"{'operator':<22} {'quantity':<26} {'max abs':>10} {'max rel':>10} {'tol':>7}  result"]
        for c in self.checks:
            lines.append(f"{c.operator:<22} {c.quantity:<26} {c.max_abs:10.2e} {c.max_rel:10.2e} "
                         f"{c.tolerance:7.0e}  {'pass' if c.passed else 'FAIL'}")
        for s in self.selection:
            lines.append(f"expert selection, layer {s.layer}: {s.agree}/{s.tokens} tokens agree "
                         f"({100 * s.agreement:.2f}%), {s.disagree - s.near_ties} disagreements beyond near ties "
                         f"(gap <= {NEAR_TIE:g}); smallest gap {s.min_gap:.2e}  {'pass' if s.passed else 'FAIL'}")
        lines.append(f"parity ({self.mode}): {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    if isinstance(x, Tensor):
        return x.asnumpy().astype(np.float32)
    return np.asarray(x, dtype=np.float32)


def errors(ms_value: Any, torch_value: Any) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|)."""
    a, b = _np(ms_value), _np(torch_value)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: MindSpore {a.shape}, PyTorch {b.shape}")
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


class _Recorder:
    def __init__(self, report: ParityReport):
        self.report = report

    def add(self, operator: str, quantity: str, kind: str, ms_value: Any, torch_value: Any) -> Check:
        max_abs, max_rel = errors(ms_value, torch_value)
        c = Check(operator, quantity, kind, max_abs, max_rel, TOLERANCES[kind])
        self.report.checks.append(c)
        return c


def _maybe_jit(fn, mode: str):
    return ms.jit(fn) if mode == "graph" else fn


def _t(a: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, requires_grad=requires_grad)


def _m(a: np.ndarray) -> Tensor:
    return Tensor(a)


def selection_agreement(layer: int, ids_ms: np.ndarray, ids_torch: np.ndarray, ranked_torch: np.ndarray) -> Selection:
    """Compare the experts chosen per token (as sets); classify disagreements by the reference's
    K-th vs (K+1)-th ranking-score gap."""
    K = ids_torch.shape[1]
    same = (np.sort(ids_ms, axis=1) == np.sort(ids_torch, axis=1)).all(axis=1)
    ordered = -np.sort(-ranked_torch, axis=1)
    gaps = ordered[:, K - 1] - ordered[:, K] if ranked_torch.shape[1] > K else np.full(len(same), np.inf)
    near = (~same) & (gaps <= NEAR_TIE)
    return Selection(layer, int(same.size), int(same.sum()), int(near.sum()), float(np.min(gaps)))


def _ranking_scores(router: torch.nn.Module, x_TD: torch.Tensor) -> np.ndarray:
    """What the PyTorch router ranks: its scores plus the selection bias, -inf outside the kept groups."""
    from workbench.moe.routers import SigmoidRouter

    with torch.no_grad():
        out = router(x_TD)
        ranked = router.biased(out.scores_TE) if hasattr(router, "biased") else out.scores_TE
        if isinstance(router, SigmoidRouter) and router.num_groups > 1:
            ranked = router._mask_to_kept_groups(ranked)
    return ranked.numpy()


# --- operator checks -------------------------------------------------------------------------------


def _operator_checks(rec: _Recorder, cfg: ModelConfig, tm: torch.nn.Module, mm: msm.MoELM, mode: str,
                     rng: np.random.Generator, tokens: int) -> None:
    D, V = cfg.d_model, cfg.vocab_size
    x = rng.normal(0, 1, (tokens, D)).astype(np.float32)
    probe = rng.normal(0, 1, (tokens, D)).astype(np.float32)

    # embedding
    ids = rng.integers(0, V, (tokens,))
    table = tm.embed.weight.detach().numpy()
    tt = _t(table, True)
    (torch.nn.functional.embedding(torch.from_numpy(ids), tt) * _t(probe)).sum().backward()

    ids_m, probe_m, x_m = _m(ids.astype(np.int32)), _m(probe), _m(x)

    def emb(t_):
        return (ops.gather(t_, ids_m, 0) * probe_m).sum()

    def emb_forward(t_):
        return ops.gather(t_, ids_m, 0)

    out = _maybe_jit(emb_forward, mode)(_m(table))
    rec.add("embedding", "forward", "forward", out, table[ids])
    rec.add("embedding", "grad table", "gradient", _maybe_jit(ms.grad(emb, 0), mode)(_m(table)), tt.grad)

    # RMSNorm
    norm_t = tm.blocks[0].attn_norm
    with torch.no_grad():
        norm_t.weight.copy_(torch.from_numpy(rng.normal(1, 0.1, D).astype(np.float32)))
    norm_m = msm.RMSNorm(D, cfg.norm_eps)
    norm_m.weight.set_data(_m(norm_t.weight.detach().numpy()))
    xt = _t(x, True)
    yt = norm_t(xt)
    (yt * _t(probe)).sum().backward()
    def norm_forward(x_):
        return norm_m(x_)

    def norm_loss(x_):
        return (norm_m(x_) * probe_m).sum()

    rec.add("RMSNorm", "forward", "forward", _maybe_jit(norm_forward, mode)(x_m), yt)
    g = _maybe_jit(ms.grad(norm_loss, 0, norm_m.trainable_params()), mode)(x_m)
    rec.add("RMSNorm", "grad x", "gradient", g[0], xt.grad)
    rec.add("RMSNorm", "grad weight", "gradient", g[1][0], norm_t.weight.grad)
    norm_t.weight.grad = None

    # RoPE
    from workbench.model import apply_rotary, rotary_tables

    S = min(cfg.seq_len, tokens // 2)
    q = rng.normal(0, 1, (2, cfg.n_heads, S, cfg.head_dim)).astype(np.float32)
    cos, sin = (t.numpy() for t in rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_base))
    ref = apply_rotary(torch.from_numpy(q), torch.from_numpy(cos[:S]), torch.from_numpy(sin[:S]))
    cos_m, sin_m = _m(cos[:S]), _m(sin[:S])
    def rope_forward(q_):
        return msm.apply_rotary(q_, cos_m, sin_m)

    rope = _maybe_jit(rope_forward, mode)
    rec.add("RoPE", "forward", "forward", rope(_m(q)), ref)

    # attention (block 0's weights)
    attn_t, attn_m = tm.blocks[0].attn, mm.blocks[0].attn
    xa = x[: 2 * S].reshape(2, S, D)
    pa = probe[: 2 * S].reshape(2, S, D)
    xt = _t(xa, True)
    yt = attn_t(xt, tm.rope_cos[:S], tm.rope_sin[:S])  # the tables at the S positions
    (yt * _t(pa)).sum().backward()
    rope_cos, rope_sin = _m(cos), _m(sin)
    pa_m = _m(pa)

    def attn_forward(x_):
        return attn_m(x_, rope_cos, rope_sin)

    def attn_loss(x_):
        return (attn_m(x_, rope_cos, rope_sin) * pa_m).sum()

    rec.add("attention", "forward", "forward", _maybe_jit(attn_forward, mode)(_m(xa)), yt)
    g = _maybe_jit(ms.grad(attn_loss, 0,
                           attn_m.trainable_params()), mode)(_m(xa))
    rec.add("attention", "grad x", "gradient", g[0], xt.grad)
    rec.add("attention", "grad qkv, out", "gradient", np.concatenate([_np(w).ravel() for w in g[1]]),
            np.concatenate([attn_t.qkv.weight.grad.numpy().ravel(), attn_t.out.weight.grad.numpy().ravel()]))
    tm.zero_grad(set_to_none=True)

    if cfg.moe is None:
        return
    moe_index = cfg.moe_layers[0]
    layer_t, layer_m = tm.blocks[moe_index].ffn, mm.blocks[moe_index].ffn
    K, E = cfg.moe.top_k, cfg.moe.num_experts

    # router
    xt = _t(x, True)
    rt = layer_t.router(xt)
    def router_forward(x_):
        return layer_m.router(x_)

    ids_m, weights_m, scores_m, logits_m = _maybe_jit(router_forward, mode)(x_m)
    rec.add("router", "logits", "forward", logits_m, rt.logits_TE)
    rec.add("router", "scores", "forward", scores_m, rt.scores_TE)
    sel = selection_agreement(-1, ids_m.asnumpy(), rt.expert_ids_TK.numpy(), _ranking_scores(layer_t.router, xt))
    if sel.agree == sel.tokens:  # gates compare slot by slot only where the same experts were chosen
        order_m = np.argsort(ids_m.asnumpy(), axis=1)
        order_t = np.argsort(rt.expert_ids_TK.numpy(), axis=1)
        rec.add("router", "gates", "forward", np.take_along_axis(weights_m.asnumpy(), order_m, 1),
                np.take_along_axis(rt.weights_TK.detach().numpy(), order_t, 1))
    rec.report.checks.append(Check("router", f"selected experts ({sel.agree}/{sel.tokens} agree)", "forward",
                                   float(sel.disagree - sel.near_ties), float(sel.disagree - sel.near_ties), 0.0))
    probe_w = rng.normal(0, 1, (tokens, E)).astype(np.float32)
    (rt.scores_TE * _t(probe_w)).sum().backward()
    probe_w_m = _m(probe_w)
    def router_loss(x_):
        return (layer_m.router(x_)[2] * probe_w_m).sum()

    gm = _maybe_jit(ms.grad(router_loss, 0,
                            layer_m.router.trainable_params()), mode)(x_m)
    rec.add("router", "grad x (via scores)", "gradient", gm[0], xt.grad)
    rec.add("router", "grad weight", "gradient", gm[1][0], layer_t.router.weight.grad)
    tm.zero_grad(set_to_none=True)

    # SwiGLU experts on a full (E, C, D) buffer
    C = max(1, tokens // E)
    xe = rng.normal(0, 1, (E, C, D)).astype(np.float32)
    pe = rng.normal(0, 1, (E, C, D)).astype(np.float32)
    xt = _t(xe, True)
    yt = layer_t.experts.forward_batched(xt)
    (yt * _t(pe)).sum().backward()
    experts_m = layer_m.experts
    pe_m = _m(pe)
    def experts_forward(x_):
        return experts_m.batched(x_)

    def experts_loss(x_):
        return (experts_m.batched(x_) * pe_m).sum()

    rec.add("expert FFN", "forward", "forward", _maybe_jit(experts_forward, mode)(_m(xe)), yt)
    gm = _maybe_jit(ms.grad(experts_loss, 0, experts_m.trainable_params()),
                    mode)(_m(xe))
    rec.add("expert FFN", "grad x", "gradient", gm[0], xt.grad)
    rec.add("expert FFN", "grad w1, w3, w2", "gradient", np.concatenate([_np(w).ravel() for w in gm[1]]),
            np.concatenate([layer_t.experts.w1.grad.numpy().ravel(), layer_t.experts.w3.grad.numpy().ravel(),
                            layer_t.experts.w2.grad.numpy().ravel()]))
    tm.zero_grad(set_to_none=True)

    # dispatch + combine: the whole MoE layer (router, dispatch, experts, combine, shared experts)
    B = 2
    xl = x[: B * (tokens // B)].reshape(B, tokens // B, D)
    pl = probe[: B * (tokens // B)].reshape(B, tokens // B, D)
    xt = _t(xl, True)
    yt, info = layer_t(xt)
    ((yt * _t(pl)).sum() + info.weighted_loss).backward()
    name = f"dispatch+combine ({cfg.moe.dispatch})"
    pl_m = _m(pl)
    def layer_forward(x_):
        return layer_m(x_)

    ym = _maybe_jit(layer_forward, mode)(_m(xl))
    rec.add(name, "forward", "forward", ym[0], yt)
    rec.add(name, "tokens per expert", "forward", ym[1][4], info.stats.tokens_per_expert)
    rec.add(name, "kept per expert", "forward", ym[1][5], info.stats.kept_per_expert)

    def layer_loss(x_):
        y, routing = layer_m(x_)
        return (y * pl_m).sum() + routing[9]

    params_m = layer_m.trainable_params()
    gm = _maybe_jit(ms.grad(layer_loss, 0, params_m), mode)(_m(xl))
    rec.add(name, "grad x", "gradient", gm[0], xt.grad)
    named_t = dict(layer_t.named_parameters())
    from workbench.ms.convert import torch_name

    prefix = f"blocks.{moe_index}.ffn."
    worst = max((errors(g_, named_t[torch_name(p.name)[len(prefix):]].grad) + (p.name,)
                 for p, g_ in zip(params_m, gm[1], strict=True)), key=lambda e: e[1])
    rec.report.checks.append(Check(name, "grad weights (worst)", "gradient", worst[0], worst[1],
                                   TOLERANCES["gradient"]))
    tm.zero_grad(set_to_none=True)

    # balancing losses on the same scores and selections
    from workbench.moe import balance

    logits = rng.normal(0, 2, (tokens, E)).astype(np.float32)
    sel_ids = rt.expert_ids_TK.numpy()
    sigmoid = cfg.moe.router == "sigmoid"
    Bq = 2
    S2 = tokens // Bq
    sel_t = torch.from_numpy(sel_ids)
    counts_m = _counts(sel_ids, E)
    seq_ids_m = _m(sel_ids[: Bq * S2].reshape(Bq, S2, K).astype(np.int32))

    def scores_t(z):
        return torch.sigmoid(z) if sigmoid else z.softmax(-1)

    def scores_m(z):
        if sigmoid:
            return ops.sigmoid(z)
        return ops.softmax(z, axis=-1)

    def aux_m(z):
        return msm.switch_aux_loss(scores_m(z), counts_m, K)

    def seq_m(z):
        return msm.sequence_aux_loss(scores_m(z)[: Bq * S2].reshape(Bq, S2, E), seq_ids_m)

    def z_m(z):
        return msm.router_z_loss(z)

    losses = {
        "Switch aux loss": (lambda z: balance.switch_aux_loss(scores_t(z), sel_t), aux_m),
        "sequence-wise loss": (lambda z: balance.sequence_aux_loss(scores_t(z)[: Bq * S2].view(Bq, S2, E),
                                                                   sel_t[: Bq * S2].view(Bq, S2, K)), seq_m),
        "router z-loss": (balance.router_z_loss, z_m),
    }
    for loss_name, (ft, fm) in losses.items():
        zt = _t(logits, True)
        lt = ft(zt)
        lt.backward()
        rec.add(loss_name, "forward", "forward", _maybe_jit(fm, mode)(_m(logits)), lt)
        rec.add(loss_name, "grad logits", "gradient", _maybe_jit(ms.grad(fm, 0), mode)(_m(logits)), zt.grad)

    # loss-free bias update: PyTorch's rule on a MindSpore Parameter, as the MindSpore trainer applies it
    load = rng.integers(0, 3 * tokens, E).astype(np.int32)  # int32: the loads the MindSpore layer returns
    bias = rng.normal(0, 1e-3, E).astype(np.float32)
    for rule in ("sign", "proportional"):
        bt = torch.from_numpy(bias.copy())
        balance.update_router_bias(bt, torch.from_numpy(load.astype(np.int64)), 1e-3, True, rule)
        bm = Parameter(Tensor(bias.copy()), name="bias", requires_grad=False)
        rec.add("loss-free bias update", rule, "forward", msm.update_router_bias(bm, load, 1e-3, True, rule), bt)


def _counts(ids_TK: np.ndarray, E: int) -> Tensor:
    return Tensor(np.bincount(ids_TK.ravel(), minlength=E).astype(np.int32))


# --- end to end ------------------------------------------------------------------------------------


def _end_to_end(rec: _Recorder, cfg: ModelConfig, tm: torch.nn.Module, mm: msm.MoELM, mode: str,
                rng: np.random.Generator, batch_size: int) -> None:
    from workbench.ms.convert import torch_name
    from workbench.ms.train import AdamW, clip_by_global_norm
    from workbench.train import TrainConfig
    from workbench.train.trainer import build_optimizer

    tokens = rng.integers(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    out_t = tm(torch.from_numpy(x), torch.from_numpy(y))
    out_t.loss.backward()
    params_m = mm.trainable_params()

    def forward(x_, y_):
        return mm(x_, y_)  # every output: MindSpore warns when a compiled graph drops one

    fn = _maybe_jit(ms.value_and_grad(forward, None, params_m, has_aux=True), mode)
    xm, ym = Tensor(x.astype(np.int32)), Tensor(y.astype(np.int32))
    (loss_m, logits_m, _, _, routing_m), grads_m = fn(xm, ym)
    rec.add("end to end", "logits", "forward", logits_m, out_t.logits)
    rec.add("end to end", "loss", "forward", loss_m, out_t.loss)
    named_t = dict(tm.named_parameters())
    worst = (0.0, 0.0, "")
    for p, g in zip(params_m, grads_m, strict=True):
        e = errors(g, named_t[torch_name(p.name)].grad)
        if e[1] >= worst[1]:
            worst = (e[0], e[1], torch_name(p.name))
    rec.report.checks.append(Check("end to end", f"grad, worst of {len(params_m)} ({worst[2]})", "gradient",
                                   worst[0], worst[1], TOLERANCES["gradient"]))

    # expert selection per MoE layer, against the reference's ranking scores at each layer's input
    if cfg.moe is not None:
        inputs: dict[int, torch.Tensor] = {}
        hooks = [tm.blocks[i].ffn.router.register_forward_hook(
            lambda mod, args, out, i=i: inputs.__setitem__(i, args[0].detach())) for i in cfg.moe_layers]
        with torch.no_grad():
            ref = tm(torch.from_numpy(x))
        for h in hooks:
            h.remove()
        for i, info_t, info_m in zip(cfg.moe_layers, ref.routing, routing_m, strict=True):
            rec.report.selection.append(selection_agreement(
                i, info_m[0].asnumpy(), info_t.router_output.expert_ids_TK.numpy(),
                _ranking_scores(tm.blocks[i].ffn.router, inputs[i])))

    # One AdamW step (clipping included) from each framework's own gradients: the parameters after it.
    # (Their updates alone are ill-conditioned at this level: AdamW's first step is about
    # lr * g / (|g| + eps), so a gradient entry near eps = 1e-8 turns an absolute gradient
    # difference of 1e-9 into a visible change of its update. "AdamW, same gradients" below checks
    # the optimizer itself on identical gradients.)
    tcfg = TrainConfig()
    torch_grads = {n: p.grad.detach().clone() for n, p in tm.named_parameters()}
    before = {n: p.detach().clone() for n, p in tm.named_parameters()}
    opt = build_optimizer(tm, tcfg)
    torch.nn.utils.clip_grad_norm_(tm.parameters(), tcfg.grad_clip)
    opt.step()
    before_m = {p.name: p.asnumpy().copy() for p in params_m}
    lr = Tensor(tcfg.lr, ms.float32)

    def adamw_step(grads):
        adamw = AdamW(params_m, tcfg.beta1, tcfg.beta2, tcfg.weight_decay)
        def apply(g_, lr_):
            return adamw(clip_by_global_norm(g_, tcfg.grad_clip)[0], lr_)

        _maybe_jit(apply, mode)(ms.mutable(grads), lr)

    adamw_step(tuple(grads_m))
    after_m = np.concatenate([p.asnumpy().ravel() for p in params_m])
    after_t = np.concatenate([named_t[torch_name(p.name)].detach().numpy().ravel() for p in params_m])
    rec.add("end to end", "params after one AdamW step", "step", after_m, after_t)

    # the optimizer alone: both start from the same weights and take the PyTorch gradients
    for p in params_m:
        ops.assign(p, Tensor(before_m[p.name]))
    adamw_step(tuple(Tensor(torch_grads[torch_name(p.name)].numpy()) for p in params_m))
    upd_m = np.concatenate([(p.asnumpy() - before_m[p.name]).ravel() for p in params_m])
    upd_t = np.concatenate([(named_t[torch_name(p.name)].detach() - before[torch_name(p.name)]).numpy().ravel()
                            for p in params_m])
    rec.add("AdamW, same gradients", "updates", "update", upd_m, upd_t)


def _loss_curve(rec: _Recorder, cfg: ModelConfig, mode: str, steps: int, batch_size: int) -> None:
    from workbench.ms.train import MSTrainer
    from workbench.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as root:
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, warmup_steps=max(1, steps // 10), eval_every=10 ** 6,
                           progress=False, device="cpu", run_dir=f"{root}/torch", max_bytes_per_domain=200_000)
        torch_hist = Trainer(cfg, tcfg).fit()
        # the control: PyTorch against itself, from weights perturbed by fp32 rounding (1e-7 relative)
        control = Trainer(cfg, dataclasses.replace(tcfg, run_dir=f"{root}/control"))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in control.model.parameters():
                p.mul_(1 + CONTROL_NOISE * torch.randn(p.shape, generator=generator))
        control_hist = control.fit()
        ms_hist = MSTrainer(cfg, dataclasses.replace(tcfg, run_dir=f"{root}/ms"), mode=mode, write=False).fit()
    lt, lm, lc = (np.array([r["loss"] for r in h]) for h in (torch_hist, ms_hist, control_hist))
    rec.report.curve = {"torch": lt.tolist(), "mindspore": lm.tolist(), "torch_perturbed": lc.tolist()}
    rel = np.abs(lm - lt) / np.abs(lt)
    control_rel = float((np.abs(lc - lt) / np.abs(lt)).max())
    tolerance = max(TOLERANCES["curve"], CONTROL_FACTOR * control_rel)
    rec.report.checks.append(Check("end to end", f"loss curve, {steps} steps (worst step; control {control_rel:.1e})",
                                   "curve", float(np.abs(lm - lt).max()), float(rel.max()), tolerance))


def parity_config(preset_name: str = "tiny", router: str | None = None, dispatch: str | None = None,
                  **moe_overrides: Any) -> ModelConfig:
    """A preset with the given router and dispatch; the sigmoid router gets DeepSeek-V3's options
    (4 groups, 2 kept, route scale 2.5) and every balancing loss is switched on, so that each is checked."""
    from workbench.config import preset

    over = dict(moe_overrides)
    if router is not None:
        over["router"] = router
        if router == "sigmoid":
            over.setdefault("num_groups", 4)
            over.setdefault("topk_groups", 2)
            over.setdefault("route_scale", 2.5)
    if dispatch is not None:
        over["dispatch"] = dispatch
    over.setdefault("seq_aux_loss_weight", 1e-2)
    over.setdefault("z_loss_weight", 1e-3)
    return preset(preset_name, **over)


def run_parity(cfg: ModelConfig, mode: str = "pynative", seed: int = 0, batch_size: int = 2, op_tokens: int = 64,
               curve_steps: int = 50, curve_batch_size: int = 4, operators: bool = True,
               end_to_end: bool = True) -> ParityReport:
    """Run the parity suite on ``cfg`` (see the module docstring); ``curve_steps=0`` skips the loss curve.

    A selection bias (loss-free balancing) is set to small random values, so that it takes part.
    """
    check_choice("mode", mode, MODES)
    msm.check_supported(cfg)
    msm.tune_cpu_runtime()
    report = ParityReport(cfg.to_dict(), mode)
    rec = _Recorder(report)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    from workbench.model import MoELM

    tm = MoELM(cfg)
    with torch.no_grad():
        for layer in tm.moe_layers():
            if layer.router.bias is not None:
                layer.router.bias.copy_(torch.from_numpy(rng.normal(0, 1e-2, cfg.moe.num_experts).astype(np.float32)))
    mm = from_torch(tm)
    if operators:
        _operator_checks(rec, cfg, tm, mm, mode, rng, op_tokens)
        load_numpy_state(mm, torch_state_numpy(tm))  # the operator checks changed a norm weight
    if end_to_end:
        _end_to_end(rec, cfg, tm, mm, mode, rng, batch_size)
        if curve_steps > 0:
            _loss_curve(rec, cfg, mode, curve_steps, curve_batch_size)
    return report


def worst_by_operator(report: ParityReport) -> list[dict[str, Any]]:
    """The largest max_rel of each operator (one row each), for a compact table."""
    rows: dict[str, dict[str, Any]] = {}
    for c in report.checks:
        row = rows.setdefault(c.operator, {"operator": c.operator, "max_abs": 0.0, "max_rel": 0.0, "passed": True})
        row["max_abs"] = max(row["max_abs"], c.max_abs)
        row["max_rel"] = max(row["max_rel"], c.max_rel if math.isfinite(c.max_rel) else math.inf)
        row["passed"] = row["passed"] and c.passed
    return list(rows.values())
