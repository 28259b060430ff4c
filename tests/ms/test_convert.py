"""Weights both ways between PyTorch and MindSpore through safetensors, and configs the MindSpore
model cannot express refused by field name."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed: pip install 'moe-workbench[mindspore]'")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from workbench.model import MoELM  # noqa: E402
from workbench.ms import convert  # noqa: E402
from workbench.ms.model import ModelOutputs, check_supported  # noqa: E402
from workbench.ms.model import MoELM as MSMoELM  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    from workbench.config import preset

    # every kind of tensor: router bias, shared expert with gate, a dense first layer
    return preset("tiny", router="sigmoid", bias_update_rate=1e-3, num_shared_experts=1,
                  shared_expert_gate=True).replace(n_layers=2, seq_len=32, first_dense_layers=1)


def test_names_follow_the_table():
    assert convert.ms_name("embed.weight") == "embed"
    assert convert.ms_name("blocks.3.attn.qkv.weight") == "blocks.3.attn.qkv"
    assert convert.ms_name("blocks.0.ffn.shared_experts.w2.weight") == "blocks.0.ffn.shared_experts.w2"
    assert convert.ms_name("blocks.0.ffn.experts.w1") == "blocks.0.ffn.experts.w1"
    assert convert.ms_name("blocks.0.ffn.router.weight") == "blocks.0.ffn.router.weight"
    for name in ("embed", "lm_head", "blocks.1.ffn.w1", "blocks.1.ffn.shared_gate", "norm.weight",
                 "blocks.1.ffn.router.bias"):
        assert convert.ms_name(convert.torch_name(name)) == name


def test_round_trip_is_exact_and_covers_every_tensor(cfg, tmp_path):
    torch.manual_seed(0)
    tm = MoELM(cfg)
    with torch.no_grad():
        tm.blocks[1].ffn.router.bias.normal_()
    mm = convert.from_torch(tm)
    assert {convert.torch_name(p.name) for p in mm.get_parameters()} == set(tm.state_dict())
    path = convert.save_safetensors(mm, tmp_path / "w.safetensors")
    back = MoELM(cfg)
    back.load_state_dict(load_file(str(path)), strict=True)  # PyTorch reads the MindSpore file as it is
    for k, v in tm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    again = convert.to_torch(convert.load_safetensors(path))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tm.state_dict().items())


def test_a_trainer_checkpoint_runs_in_mindspore(tmp_path):
    from workbench.config import preset
    from workbench.train import TrainConfig, Trainer

    cfg = preset("tiny", bias_update_rate=1e-3).replace(n_layers=2, seq_len=32, tie_embeddings=True)
    trainer = Trainer(cfg, TrainConfig(steps=2, batch_size=2, progress=False, device="cpu", run_dir=str(tmp_path),
                                       max_bytes_per_domain=20_000))
    trainer.fit()
    mm = convert.load_torch_checkpoint(trainer.last_checkpoint())
    tokens = trainer.data.get_batch(0).tokens
    trainer.model.eval()
    with torch.no_grad():
        ref = trainer.model(tokens).logits.numpy()
    out = ModelOutputs(*mm(convert.require_mindspore().Tensor(tokens.numpy().astype(np.int32))))
    assert np.abs(out.logits.asnumpy() - ref).max() <= 1e-5 * np.abs(ref).max()
    # the trained loss-free bias came along
    assert np.array_equal(mm.blocks[0].ffn.router.bias.asnumpy(), trainer.model.blocks[0].ffn.router.bias.numpy())


def test_bad_weights_are_named(cfg):
    torch.manual_seed(0)
    state = convert.torch_state_numpy(MoELM(cfg))
    mm = MSMoELM(cfg)
    missing = dict(state)
    missing.pop("blocks.1.ffn.experts.w2")
    with pytest.raises(ValueError, match=r"'blocks.1.ffn.experts.w2' is missing"):
        convert.load_numpy_state(mm, missing)
    wrong = dict(state, **{"embed.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(3, 3\)"):
        convert.load_numpy_state(mm, wrong)
    extra = dict(state, **{"blocks.9.attn.qkv.weight": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="not part of this model"):
        convert.load_numpy_state(mm, extra)


@pytest.mark.parametrize(("moe", "model", "field"), [
    ({"router": "expert_choice"}, {}, "router"),
    ({"router": "noisy_topk"}, {}, "router"),
    ({"router_jitter": 0.1}, {}, "router_jitter"),
    ({"aux_loss_scope": "global_batch"}, {}, "aux_loss_scope"),
    ({"dispatch": "capacity", "drop_policy": "score"}, {}, "drop_policy"),
    ({"dispatch": "capacity", "capacity_scope": "sequence"}, {}, "capacity_scope"),
    ({}, {"dropout": 0.1}, "dropout"),
])
def test_what_mindspore_cannot_express_is_refused_by_name(moe, model, field):
    from workbench.config import preset

    cfg = preset("tiny", **moe).replace(**model)
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: .*MindSpore"):
        check_supported(cfg)
    with pytest.raises(ValueError, match=rf"^{field}="):
        MSMoELM(cfg)
