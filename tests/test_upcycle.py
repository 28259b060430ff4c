"""Sparse upcycling (``workbench.upcycle``, ``workbench upcycle``): the step-0 function of every method
against the dense model, fp32, with the case each test is in stated beside it; the checkpoint it
writes loads; bad inputs are one ``ValueError`` naming the field or tensor, and one line, exit 2.

The dense models have weights of std fan_in^-1/2 (logits of order one, as a trained model's), so
an absolute tolerance of 1e-5 on the logits (max |logit| 4.3) is a strict test. Measured here, max
|diff| of the logits: copy, every renormalised router, zero or small router (and with route_scale,
a shared expert, dense first layers): 0.7e-6 to 2.0e-6; granular with top_k = E and a zero router
(pure, slices held by several experts, with a shared slice): 1.2e-6 to 1.7e-6. Not exact: granular
top_k = E with a small router 2.9e-2; granular top_k = 2 of 4: 3.7 (zero) and 4.6 (small); switch
(zero router) 3.1; raw top-k probabilities 2.1; expert choice 2.3; soft MoE 4.1; Drop-Upcycling
r = 0.25 2.5 and r = 0.5 4.6; noise 0.01 0.07."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from workbench.config import ModelConfig, MoEConfig, preset
from workbench.model import MoELM
from workbench.upcycle import (
    read_upcycle_metadata,
    step0_statement,
    upcycle,
    upcycle_checkpoint,
    upcycle_with_report,
)

DENSE = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=2, n_heads=2, dense_hidden=64, moe=None)
RENORMALISED = ("softmax_topk", "sigmoid", "cosine", "hash", "noisy_topk", "sinkhorn", "uniform", "random")
TOL = 1e-5


def _dense(cfg: ModelConfig = DENSE, seed: int = 0) -> MoELM:
    """A dense model with weights of std fan_in^-1/2: the FFN matters and the logits are of order one."""
    torch.manual_seed(seed)
    model = MoELM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=p.shape[-1] ** -0.5)
            else:
                p.normal_(1.0, 0.1)  # norms
    return model.eval()


@pytest.fixture(scope="module")
def dense():
    model = _dense()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.abs().max() > 1.0  # the tolerance is small next to the logits
    return model, tokens, logits


def _moe(**moe) -> ModelConfig:
    return DENSE.replace(moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 64, **moe}))


def _max_diff(model, tokens, logits) -> float:
    with torch.no_grad():
        return (model(tokens).logits - logits).abs().max().item()


def _ffn_input(model: MoELM, tokens: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """The normalised input of ``layer``'s FFN (the dense and upcycled models share everything before it)."""
    with torch.no_grad():
        x = model.embed(tokens)
        S = tokens.shape[1]
        for block in model.blocks[:layer]:
            x, _ = block(x, model.rope_cos[:S], model.rope_sin[:S], tokens, None)
        block = model.blocks[layer]
        x = x + block.attn(block.attn_norm(x), model.rope_cos[:S], model.rope_sin[:S])
        return block.ffn_norm(x)


# --- copy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("router_init", ["zero", "small"])
@pytest.mark.parametrize("router", RENORMALISED)
def test_copy_keeps_the_dense_logits_for_every_router_whose_gates_sum_to_one(dense, router, router_init):
    """Every expert is the dense FFN and the gates sum to one, so sum_k g_k FFN(x) = FFN(x): exact.
    noisy_topk and sinkhorn are checked in evaluation (as upcycle returns the model) and in
    training mode, where noisy_topk's noise and sinkhorn's balancing change only which experts."""
    model, tokens, logits = dense
    cfg = _moe(router=router)
    moe, report = upcycle_with_report(model, cfg, method="copy", router_init=router_init)
    assert report.step0.startswith("exact") and report.expert_scale == 1.0
    assert _max_diff(moe, tokens, logits) < TOL
    if router in ("noisy_topk", "sinkhorn"):
        assert _max_diff(moe.train(), tokens, logits) < TOL


def test_copy_divides_route_scale_out_of_the_down_projections(dense):
    """DeepSeek-style route_scale 2.5: the gates sum to 2.5, so W2 is divided by 2.5: exact."""
    model, tokens, logits = dense
    moe, report = upcycle_with_report(model, _moe(router="sigmoid", route_scale=2.5), method="copy")
    assert report.expert_scale == pytest.approx(0.4)
    assert _max_diff(moe, tokens, logits) < TOL


@pytest.mark.parametrize("layout", [{"first_dense_layers": 1}, {"moe_every": 2}])
def test_copy_keeps_the_dense_layers_of_the_moe_model(dense, layout):
    model, tokens, logits = dense
    cfg = _moe().replace(**layout)
    assert cfg.moe_layers == [1] if "first_dense_layers" in layout else [0]
    assert _max_diff(upcycle(model, cfg), tokens, logits) < TOL


def test_switch_gates_with_the_raw_probability_so_copy_is_not_exact(dense):
    """Switch's gate is the raw top-1 probability, not 1: under router_init='zero' it is exactly
    1/E, so each MoE layer gives FFN(x) / E (checked at the first layer's FFN to 1e-6), and the
    logits move by far more than the tolerance (measured: max |diff| 3.1)."""
    model, tokens, logits = dense
    E = 4
    moe, report = upcycle_with_report(model, _moe(router="switch", top_k=1), method="copy", router_init="zero")
    assert report.step0.startswith("not exact") and "1/E" in report.step0
    x = _ffn_input(moe, tokens)
    with torch.no_grad():
        y_moe, routing = moe.blocks[0].ffn(x, tokens)
        y_dense = model.blocks[0].ffn(x)
    assert torch.allclose(routing.router_output.weights_TK, torch.full_like(routing.router_output.weights_TK, 1 / E))
    assert (y_moe - y_dense / E).abs().max() < 1e-6
    assert _max_diff(moe, tokens, logits) > 0.05


def test_a_capacity_dispatch_is_stated_not_exact():
    assert step0_statement(_moe(dispatch="capacity"), "copy").startswith("not exact: dispatch='capacity'")
    assert step0_statement(_moe(dispatch="capacity", capacity_factor=None), "copy").startswith("exact")


@pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")
@pytest.mark.parametrize("moe, why", [({"normalize_topk": False}, "raw"), ({"router": "soft_moe"}, "soft_moe"),
                                      ({"router": "expert_choice"}, "expert_choice")])
def test_a_router_whose_gates_do_not_sum_to_one_is_stated_and_measured_not_exact(dense, moe, why):
    """Raw top-k probabilities (sum about k/E), soft MoE (experts see averages of tokens) and expert
    choice (0 to E experts per token, raw probabilities): the statement says so, and the logits
    differ by more than the tolerance (measured max |diff|: 0.4 to 1.3)."""
    model, tokens, logits = dense
    cfg = _moe(**moe)
    statement = step0_statement(cfg, "copy")
    assert statement.startswith("not exact") and why in statement
    assert _max_diff(upcycle(model, cfg, method="copy"), tokens, logits) > 1e-2


# --- granular --------------------------------------------------------------------------------


@pytest.mark.parametrize("route_scale", [1.0, 4.0])
def test_granular_is_exact_when_every_expert_is_selected_with_equal_gates(dense, route_scale):
    """The stated exact case: E = 4 experts of H / E = 16 units, top_k = E, a renormalised router at
    zero (every gate 1/E). With route_scale = E every gate is 1 and W2 is kept; with route_scale = 1
    W2 is multiplied by E instead. Either way the sum of the slices is the dense FFN."""
    model, tokens, logits = dense
    cfg = _moe(top_k=4, expert_hidden=16, route_scale=route_scale)
    moe, report = upcycle_with_report(model, cfg, method="granular", router_init="zero")
    assert report.slices == 4 and report.expert_scale == pytest.approx(4.0 / route_scale)
    assert report.step0.startswith("exact")
    assert _max_diff(moe, tokens, logits) < TOL


def test_granular_with_copies_of_each_slice_is_exact_with_all_selected(dense):
    """E = 8 experts, slices of 32 units (g = 2 slices, each held by 4 experts), top_k = 8, zero router."""
    model, tokens, logits = dense
    moe, report = upcycle_with_report(model, _moe(num_experts=8, top_k=8, expert_hidden=32), method="granular",
                                      router_init="zero")
    assert report.slices == 2 and report.expert_scale == pytest.approx(2.0)
    assert _max_diff(moe, tokens, logits) < TOL


def test_granular_is_not_exact_otherwise_and_says_by_how_much(dense):
    """top_k = E with a small router: the gates are only nearly 1/E (measured max |diff| 2.9e-2).
    top_k = 2 < E = 4: each token keeps 2 of the 4 slices (W2 x 4, gates 1/2 each): far from the dense
    function (relative error of the first layer's FFN above 30 %), but the average over the 6
    possible pairs is the dense FFN: unbiased over a uniformly random choice of the pair."""
    model, tokens, logits = dense
    near, report = upcycle_with_report(model, _moe(top_k=4, expert_hidden=16), method="granular", router_init="small")
    assert report.step0.startswith("not exact")
    assert 1e-6 < _max_diff(near, tokens, logits) < 0.1

    sparse, report = upcycle_with_report(model, _moe(top_k=2, expert_hidden=16), method="granular", router_init="small")
    assert report.step0.startswith("not exact") and "expectation" in report.step0
    x = _ffn_input(sparse, tokens)
    with torch.no_grad():
        y_moe, _ = sparse.blocks[0].ffn(x, tokens)
        y_dense = model.blocks[0].ffn(x)
        experts = sparse.blocks[0].ffn.experts
        # the average over all 6 pairs of slices, each with gates 1/2 and W2 x 4: the dense FFN exactly
        parts = [experts.forward_one(e, x.reshape(-1, 32)) for e in range(4)]
        pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
        mean = sum(0.5 * (parts[a] + parts[b]) for a, b in pairs) / len(pairs)
    assert (y_moe - y_dense).norm() / y_dense.norm() > 0.3
    assert torch.allclose(mean, y_dense.reshape(-1, 32), atol=1e-5)


# --- Drop-Upcycling ----------------------------------------------------------------------------


def test_drop_differs_from_the_dense_ffn_by_exactly_the_reinitialised_units(dense):
    """r = 0.25 of each expert's 64 units (16) re-initialised, chosen per expert; the layer's output
    minus the dense FFN's equals sum_k g_k sum_{u in S_e} (a'_u w2'_u - a_u w2_u), computed unit by
    unit from the weights (a_u = silu(x w1_u) (x w3_u)); every other unit is the dense one."""
    model, tokens, _ = dense
    r, H = 0.25, 64
    moe, report = upcycle_with_report(model, _moe(), method="drop", drop_ratio=r, seed=3)
    assert report.step0.startswith("not exact")
    dense_ffn = model.blocks[0].ffn
    w1, w3, w2 = dense_ffn.w1.weight.T, dense_ffn.w3.weight.T, dense_ffn.w2.weight.T  # (D, H), (D, H), (H, D)
    layer = moe.blocks[0].ffn
    for i in moe.cfg.moe_layers:
        experts = moe.blocks[i].ffn.experts
        dw = model.blocks[i].ffn
        for e in range(4):
            units = report.reinitialised[(i, e)]
            assert len(units) == round(r * H) and len(set(units)) == len(units)
            changed = ((experts.w1[e] != dw.w1.weight.T).any(0) | (experts.w3[e] != dw.w3.weight.T).any(0)
                       | (experts.w2[e] != dw.w2.weight.T).any(1))
            assert changed.nonzero().flatten().tolist() == units  # exactly those units differ
        assert len({tuple(report.reinitialised[(i, e)]) for e in range(4)}) == 4  # chosen per expert

    x_TD = _ffn_input(moe, tokens).reshape(-1, 32)
    with torch.no_grad():
        y_moe, routing = layer(x_TD[None], tokens.reshape(1, -1))
        y_dense = dense_ffn(x_TD)
        expected = torch.zeros_like(y_dense)
        ids_TK, gates_TK = routing.router_output.expert_ids_TK, routing.router_output.weights_TK
        ex = layer.experts
        for t in range(x_TD.shape[0]):
            x = x_TD[t]
            for e, g in zip(ids_TK[t].tolist(), gates_TK[t].tolist(), strict=True):
                for u in report.reinitialised[(0, e)]:
                    new = F.silu(x @ ex.w1[e][:, u]) * (x @ ex.w3[e][:, u]) * ex.w2[e][u]
                    old = F.silu(x @ w1[:, u]) * (x @ w3[:, u]) * w2[u]
                    expected[t] += g * (new - old)
    diff = y_moe.reshape(-1, 32) - y_dense
    assert diff.abs().max() > 1e-3  # the re-initialised units do change the output
    assert torch.allclose(diff, expected, atol=1e-5)


def test_drop_draws_new_units_from_the_dense_matrices_statistics(dense):
    model, _, _ = dense
    moe, report = upcycle_with_report(model, _moe(num_experts=8), method="drop", drop_ratio=0.5)
    w1 = model.blocks[1].ffn.w1.weight
    new = torch.cat([moe.blocks[1].ffn.experts.w1[e][:, report.reinitialised[(1, e)]].flatten() for e in range(8)])
    assert new.mean().item() == pytest.approx(w1.mean().item(), abs=0.02)
    assert new.std().item() == pytest.approx(w1.std().item(), rel=0.05)


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_drop_ratio_ends(dense, r):
    """r = 0 is copy (exact); r = 1 re-initialises every unit of every expert."""
    model, tokens, logits = dense
    moe, report = upcycle_with_report(model, _moe(), method="drop", drop_ratio=r)
    assert all(len(u) == round(r * 64) for u in report.reinitialised.values())
    assert (_max_diff(moe, tokens, logits) < TOL) == (r == 0.0)


# --- shared expert -----------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [False, True])
def test_copy_with_a_shared_expert_splits_the_dense_output_half_and_half(dense, gate):
    """The shared expert is a copy of the dense FFN; it and the routed copies each give half (W2 / 2,
    or W2 whole behind Qwen2-MoE's zero-initialised gate, sigmoid(0) = 1/2): exact."""
    model, tokens, logits = dense
    cfg = _moe(num_shared_experts=1, shared_expert_hidden=64, shared_expert_gate=gate)
    moe, report = upcycle_with_report(model, cfg, method="copy", shared_expert=True)
    assert report.expert_scale == 0.5 and report.shared_scale == (1.0 if gate else 0.5)
    assert _max_diff(moe, tokens, logits) < TOL


def test_granular_with_a_shared_slice_is_exact_with_all_routed_selected(dense):
    """Shared expert: the first 16 dense units, whole; 3 routed experts of 16 units, top_k = 3, zero router."""
    model, tokens, logits = dense
    cfg = _moe(num_experts=3, top_k=3, expert_hidden=16, num_shared_experts=1, shared_expert_hidden=16)
    moe, report = upcycle_with_report(model, cfg, method="granular", router_init="zero", shared_expert=True)
    assert report.slices == 3 and report.step0.startswith("exact")
    assert _max_diff(moe, tokens, logits) < TOL


# --- refusals (API) ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"drop_ratio": 1.5}, "drop_ratio"), ({"method": "sparse"}, "method"), ({"router_init": "xavier"}, "router_init"),
    ({"noise": -1.0}, "noise"), ({"moe": {"expert_hidden": 32}}, "moe.expert_hidden"),
    ({"moe": {"num_shared_experts": 1}}, "moe.num_shared_experts"), ({"d_model": 64}, "d_model"),
])
def test_bad_inputs_are_a_value_error_naming_the_field(dense, kwargs, field):
    model = dense[0]
    moe = kwargs.pop("moe", {})
    cfg = _moe(**moe).replace(**{k: kwargs.pop(k) for k in list(kwargs) if k == "d_model"})
    with pytest.raises(ValueError, match=f"^{field}="):
        upcycle(model, cfg, **kwargs)


def test_a_state_dict_of_another_shape_names_the_tensor(dense):
    state = dense[0].state_dict()
    bad = {**state, "blocks.1.attn.qkv.weight": torch.zeros(96, 48)}
    with pytest.raises(ValueError, match=r"'blocks\.1\.attn\.qkv\.weight' has shape \(96, 48\)"):
        upcycle(bad, _moe())
    with pytest.raises(ValueError, match=r"'blocks\.1\.ffn_norm\.weight' is missing"):
        upcycle({k: v for k, v in state.items() if k != "blocks.1.ffn_norm.weight"}, _moe())
    moe_model = MoELM(_moe())
    with pytest.raises(ValueError, match="not dense"):
        upcycle(moe_model, _moe())
    with pytest.raises(ValueError, match=r"'blocks\.0\.ffn\.experts\.w1'.*not a dense model"):
        upcycle(moe_model.state_dict(), _moe())


def test_a_state_dict_upcycles_as_the_model_does(dense):
    model, tokens, _ = dense
    a = upcycle(model, _moe(), method="drop", seed=5)
    b = upcycle(model.state_dict(), _moe(), method="drop", seed=5)
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


# --- checkpoints and the CLI ---------------------------------------------------------------------


def _save_dense(run_dir, cfg: ModelConfig) -> None:
    """A run checkpoint of a (dense or MoE) model, written by the trainer's writer."""
    from workbench.train import TrainConfig
    from workbench.train.checkpoint import save_checkpoint

    model = _dense(cfg) if cfg.moe is None else MoELM(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(run_dir, 7, model, optimizer, scheduler, cfg.to_dict(), TrainConfig().to_dict())


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("upcycle") / "dense"
    _save_dense(run_dir, DENSE)
    return run_dir


def test_the_written_checkpoint_loads_with_load_model_and_records_its_source(dense_run, tmp_path):
    import workbench

    cfg = _moe(router="sigmoid")
    path = upcycle_checkpoint(dense_run, tmp_path / "up", cfg, method="drop", drop_ratio=0.5, seed=2)
    assert path == tmp_path / "up" / "ckpt-00000000.safetensors"
    loaded = workbench.load_model(path)
    assert loaded.cfg == cfg and not loaded.training
    assert workbench.load_model(tmp_path / "up").cfg == cfg  # the folder, as --init-from RUN reads it
    dense = workbench.load_model(dense_run)
    direct = upcycle(dense, cfg, method="drop", drop_ratio=0.5, seed=2)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, direct(tokens).logits)
    info = read_upcycle_metadata(path)
    assert info["method"] == "drop" and info["drop_ratio"] == 0.5 and info["seed"] == 2
    assert info["source"] == {"path": str((dense_run / "ckpt-00000007.safetensors").resolve()), "step": 7}
    assert info["reinitialised_per_expert"] == [32] and info["step0"].startswith("not exact")
    with pytest.raises(ValueError, match="exists"):
        upcycle_checkpoint(dense_run, path, cfg)
    assert upcycle_checkpoint(dense_run, path, cfg, overwrite=True) == path
    assert not list(tmp_path.glob("**/*.tmp"))


def _cli(capsys, *args):
    from workbench.cli import main

    status = main(["upcycle", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def tiny_dense_run(tmp_path_factory):
    """A dense run of the tiny preset's shape (d_model 128, 4 layers, hidden 256)."""
    run_dir = tmp_path_factory.mktemp("upcycle") / "tiny-dense"
    _save_dense(run_dir, preset("tiny").replace(moe=None))
    return run_dir


def test_cli_writes_an_upcycled_run_and_states_step_0(tiny_dense_run, tmp_path, capsys):
    import workbench

    status, out, err = _cli(capsys, "--from", tiny_dense_run, "--to", tmp_path / "up", "--method", "granular",
                            "--top-k", "8", "--router-init", "zero")
    assert status == 0, err
    assert "granular upcycling" in out and "8 experts x 32 hidden" in out and "step 0: exact" in out
    model = workbench.load_model(tmp_path / "up")
    assert model.cfg.moe.expert_hidden == 32 and model.cfg.moe.top_k == 8
    dense = workbench.load_model(tiny_dense_run)
    tokens = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        assert (model(tokens).logits - dense(tokens).logits).abs().max() < TOL

    status, out, err = _cli(capsys, "--from", tiny_dense_run, "--to", tmp_path / "shared.safetensors",
                            "--shared-expert", "--router", "switch")
    assert status == 0, err
    meta = read_upcycle_metadata(tmp_path / "shared.safetensors")
    assert meta["shared_expert"] and meta["method"] == "copy" and "1 shared expert" in out
    assert workbench.load_model(tmp_path / "shared.safetensors").cfg.moe.shared_hidden == 256


def test_cli_prints_the_train_command_that_fits_the_upcycled_checkpoint(tiny_dense_run, tmp_path, capsys):
    """Copies take the dense hidden size (256), which is not the tiny preset's expert_hidden (128):
    the printed command names it, and a model built from its flags has the checkpoint's config."""
    import shlex

    import workbench
    from workbench.cli import build_parser
    from workbench.cli.train import configs_from_args

    status, out, err = _cli(capsys, "--from", tiny_dense_run, "--to", tmp_path / "up", "--shared-expert")
    assert status == 0, err
    command = next(line for line in out.splitlines() if line.startswith("train from it: "))
    args = shlex.split(command.removeprefix("train from it: workbench ").replace("RUN_DIR", str(tmp_path / "ft")))
    assert "--expert-hidden" in args and "--num-shared-experts" in args
    model_cfg, train_cfg = configs_from_args(build_parser().parse_args(args))  # what `workbench train` builds
    assert model_cfg == workbench.load_model(tmp_path / "up").cfg
    assert train_cfg.init_from == str(tmp_path / "up" / "ckpt-00000000.safetensors")


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle-bad")
    _save_dense(root / "narrow", ModelConfig(d_model=64, n_layers=4, n_heads=4, dense_hidden=256, moe=None))
    _save_dense(root / "moe", preset("tiny"))
    return root


@pytest.mark.parametrize("args, words", [
    (["--from", "narrow"], "d_model=128 (--preset tiny) does not match the dense checkpoint"),
    (["--method", "drop", "--drop-ratio", "1.5"], "drop_ratio=1.5 is invalid: must be in [0, 1]"),
    (["--method", "sparse"], "method='sparse' is invalid: allowed values are copy, granular, drop"),
    (["--from", "moe"], "is not dense"),
    (["--from", "nowhere"], "does not exist"),
    (["--method", "copy", "--expert-hidden", "128"], "moe.expert_hidden=128 is invalid"),
])
def test_cli_bad_inputs_exit_2_with_one_line(tiny_dense_run, bad_sources, tmp_path, capsys, args, words):
    if "--from" in args:
        args = [a if a == "--from" else str(bad_sources / a) for a in args]
    else:
        args = ["--from", tiny_dense_run, *args]
    status, out, err = _cli(capsys, *args, "--to", tmp_path / "out")
    assert status == 2
    assert err.startswith("workbench upcycle: error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert not (tmp_path / "out").exists()


def test_checkpoint_metadata_is_json(dense_run, tmp_path):
    path = upcycle_checkpoint(dense_run, tmp_path / "a.safetensors", _moe(), method="copy", noise=0.01)
    info = read_upcycle_metadata(path)
    json.dumps(info)
    assert info["noise"] == 0.01 and info["step0"].startswith("not exact: noise")


def test_the_trainers_init_from_loads_the_written_file(dense_run, tmp_path):
    """``TrainConfig.init_from`` reads the file and the folder (``workbench.train.trainer``), as
    ``workbench train --init-from`` does; a file of its own name may sit beside the dense run."""
    from workbench.train.trainer import find_init_checkpoint, load_init_weights

    cfg = _moe(router="hash")
    direct = upcycle(dense_run_model(dense_run), cfg, method="granular", seed=4)
    tokens = torch.randint(0, 256, (1, 16))
    for target in (tmp_path / "up", dense_run / "moe.safetensors"):
        path = upcycle_checkpoint(dense_run, target, cfg, method="granular", seed=4)
        for given in (path, path.parent if target.suffix != ".safetensors" else path):
            model = MoELM(cfg).eval()
            load_init_weights(model, find_init_checkpoint(given), given)
            with torch.no_grad():
                assert torch.equal(model(tokens).logits, direct(tokens).logits)
    with pytest.raises(ValueError, match="holds a training run"):
        upcycle_checkpoint(dense_run, dense_run / "ckpt-00000000.safetensors", cfg)


def dense_run_model(run_dir):
    import workbench

    return workbench.load_model(run_dir)
