"""Global-batch auxiliary loss (Qiu et al. 2025): f counted over the optimizer step's micro-batches.

Tolerance: values and router-weight gradients agree to 1e-6 (max abs error) where they must be equal.
"""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import MICRO_MODEL, write_domain_folder
from workbench.config import ModelConfig, MoEConfig
from workbench.model import MoELM
from workbench.moe import MoELayer, assignment_counts, global_batch_aux_loss, switch_aux_loss
from workbench.train import TrainConfig, Trainer

TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")


def layer_pair(router: str = "softmax_topk", **fields) -> tuple[MoELayer, MoELayer]:
    """The same weights with the micro-batch and the global-batch aux loss, in training mode."""
    torch.manual_seed(0)
    cfg = MoEConfig(router=router, num_experts=6, top_k=2, expert_hidden=16, **fields)
    micro = MoELayer(16, cfg)
    glob = MoELayer(16, MoEConfig(**{**vars(cfg), "aux_loss_scope": "global_batch"}))
    glob.load_state_dict(micro.state_dict())
    return micro.train(), glob.train()


def aux_and_router_grad(layer: MoELayer, x: torch.Tensor, padding_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    _, info = layer(x, padding_mask_BS=padding_mask)
    loss = info.losses["aux_loss"]
    (grad,) = torch.autograd.grad(loss, layer.router.weight)
    return loss.detach(), grad


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= TOL, (a, b)


def skewed_batch(seed: int, shift: float) -> torch.Tensor:
    """Inputs whose routing leans on different experts for different ``shift``s (uneven counts)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 12, 16, generator=g) + shift * torch.linspace(-1, 1, 16)


# --- (a) one micro-batch per step: the two scopes are the same loss -----------------------


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("padded", [False, True])
def test_with_one_micro_batch_per_step_global_equals_micro_batch_in_value_and_gradient(router, padded):
    micro, glob = layer_pair(router)
    x = skewed_batch(1, 2.0)
    mask = None
    if padded:
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[0, 8:] = False  # right padding in one sequence
    loss_m, grad_m = aux_and_router_grad(micro, x, mask)
    loss_g, grad_g = aux_and_router_grad(glob, x, mask)
    assert grad_m.abs().max() > 0  # a gradient worth comparing
    assert_close(loss_g, loss_m)
    assert_close(grad_g, grad_m)


def test_the_free_function_with_one_micro_batchs_counts_is_the_switch_loss():
    torch.manual_seed(3)
    scores = torch.randn(20, 5).softmax(-1)
    ids = torch.rand(20, 5).argsort(-1)[:, :2]
    mask_T = torch.rand(20) > 0.3
    slot_mask = torch.rand(20, 2) > 0.4
    for m, s in [(None, None), (mask_T, None), (None, slot_mask), (mask_T, slot_mask)]:
        counts = assignment_counts(ids, 5, m, s)
        assert_close(global_batch_aux_loss(scores, counts, m), switch_aux_loss(scores, ids, m, s))


def test_assignment_counts_leave_padding_tokens_and_padding_slots_out():
    ids = torch.tensor([[0, 1], [2, 0], [1, 2]])
    mask_T = torch.tensor([True, True, False])
    slot_mask = torch.tensor([[True, False], [True, True], [True, True]])
    assert assignment_counts(ids, 3).tolist() == [2, 2, 2]
    assert assignment_counts(ids, 3, mask_T).tolist() == [2, 1, 1]
    assert assignment_counts(ids, 3, None, slot_mask).tolist() == [2, 1, 2]
    assert assignment_counts(ids, 3, mask_T, slot_mask).tolist() == [2, 0, 1]


# --- (b) two micro-batches: the second sees both micro-batches' counts ---------------------


def test_second_micro_batch_uses_frequencies_counted_over_both_micro_batches():
    micro, glob = layer_pair()
    E = glob.cfg.num_experts
    x1, x2 = skewed_batch(1, 3.0), skewed_batch(2, -3.0)

    _, info1 = glob(x1)
    _, info2 = glob(x2)
    ids1, ids2 = info1.router_output.expert_ids_TK, info2.router_output.expert_ids_TK
    # the first micro-batch: only its own counts, so the micro-batch loss
    assert_close(info1.losses["aux_loss"], switch_aux_loss(info1.router_output.scores_TE, ids1))

    # by hand: f from both micro-batches' assignments, P from the second micro-batch only
    counts = torch.bincount(ids1.flatten(), minlength=E) + torch.bincount(ids2.flatten(), minlength=E)
    f = counts.float() / counts.sum()
    scores2 = info2.router_output.scores_TE
    expected = E * (f * scores2.mean(0)).sum()
    assert_close(info2.losses["aux_loss"], expected)
    micro_loss = switch_aux_loss(scores2, ids2)
    assert (info2.losses["aux_loss"] - micro_loss).abs() > 1e-3  # the scope changes the number
    # the gradient comes from the second micro-batch's P alone, f held fixed
    (g_loss,) = torch.autograd.grad(info2.losses["aux_loss"], glob.router.weight, retain_graph=True)
    (g_expected,) = torch.autograd.grad(expected, glob.router.weight)
    assert g_expected.abs().max() > 0
    assert_close(g_loss, g_expected)
    assert torch.equal(glob.aux_counts_since_step, counts)


def test_padding_does_not_count_in_the_running_counts():
    _, glob = layer_pair("expert_choice")
    x = skewed_batch(4, 1.0)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 6:] = False
    _, info = glob(x, padding_mask_BS=mask)
    ro = info.router_output
    assert ro.mask_TK is not None and not ro.mask_TK.all()
    real = ro.mask_TK & mask.view(-1, 1)
    assert torch.equal(glob.aux_counts_since_step, torch.bincount(ro.expert_ids_TK[real], minlength=6))


# --- (c) the step hook resets the counts ---------------------------------------------------


def test_finish_step_resets_the_counts_so_the_next_step_starts_from_its_own_micro_batch():
    micro, glob = layer_pair()
    for x in (skewed_batch(1, 3.0), skewed_batch(2, -3.0)):
        glob(x)
    assert glob.aux_counts_since_step.sum() > 0
    glob.finish_step()
    assert glob.aux_counts_since_step.sum() == 0
    x3 = skewed_batch(3, 1.0)
    loss_g, grad_g = aux_and_router_grad(glob, x3)
    loss_m, grad_m = aux_and_router_grad(micro, x3)
    assert_close(loss_g, loss_m)
    assert_close(grad_g, grad_m)


def test_model_hook_resets_every_layer_and_evaluation_neither_counts_nor_reads_the_counts():
    cfg = ModelConfig(seq_len=16, d_model=32, n_layers=2, n_heads=2, dense_hidden=64,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, aux_loss_scope="global_batch"))
    torch.manual_seed(0)
    model = MoELM(cfg)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(tokens)
    assert all(layer.aux_counts_since_step.sum() == 2 * 16 * 2 for layer in model.moe_layers())
    model.eval()
    out = model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)))
    for info in out.routing:  # evaluation: the micro-batch loss, whatever was counted in training
        assert_close(info.losses["aux_loss"], switch_aux_loss(info.router_output.scores_TE,
                                                              info.router_output.expert_ids_TK))
    assert all(layer.aux_counts_since_step.sum() == 2 * 16 * 2 for layer in model.moe_layers())
    model.finish_optimizer_step()
    assert all(layer.aux_counts_since_step.sum() == 0 for layer in model.moe_layers())
    assert "blocks.0.ffn.aux_counts_since_step" not in model.state_dict()  # step state, not model state


def test_the_micro_batch_scope_never_counts():
    micro, _ = layer_pair()
    micro(skewed_batch(1, 1.0))
    assert micro.aux_counts_since_step.sum() == 0


# --- (d) end to end through the trainer with gradient accumulation ------------------------


def test_trainer_with_grad_accum_runs_and_logs_a_different_raw_aux_loss_per_scope(tmp_path):
    data = write_domain_folder(tmp_path / "corpus")
    rows, trainers = {}, {}
    for scope in ("micro_batch", "global_batch"):
        model = MICRO_MODEL.replace(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, aux_loss_scope=scope))
        cfg = TrainConfig(run_dir=str(tmp_path / scope), data=str(data), batch_size=4, eval_windows=2,
                          progress=False, steps=2, grad_accum=2, eval_every=2, checkpoint_every=2)
        trainers[scope] = Trainer(model, cfg)
        rows[scope] = trainers[scope].fit()
    for scope, history in rows.items():
        assert [r["step"] for r in history] == [1, 2], scope
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history), scope
    # the first micro-batch of step 1 is the same in both runs; the second differs by its f
    assert abs(rows["global_batch"][0]["raw/aux_loss"] - rows["micro_batch"][0]["raw/aux_loss"]) > 1e-6
    # every step ended with the hook: nothing carried into the next step (or the checkpoint)
    for layer in trainers["global_batch"].model.moe_layers():
        assert layer.aux_counts_since_step.sum() == 0
