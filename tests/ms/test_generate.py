"""Greedy KV-cache generation in MindSpore (workbench.ms.generate): equal to PyTorch's ``generate``
(or differing first at a near tie), equal to MindSpore's own full forward at every position, the same
in PyNative and GRAPH mode; the parity report catches an injected divergence at its first step;
``workbench parity --generate`` refuses bad input in one line.

Tolerances: MindSpore's cached logits against its own full forward and against PyTorch's, 1e-5
absolute (the logits of this untrained model are O(0.1-1); the differences measured are a few
1e-7, fp32 rounding in another order).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed: pip install 'moe-workbench[mindspore]'")

import torch  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.model import MoELM  # noqa: E402
from workbench.ms.convert import from_torch  # noqa: E402
from workbench.ms.generate import (  # noqa: E402
    NEAR_TIE_LOGIT,
    PromptParity,
    generation_parity,
    ms_greedy_decode,
    ms_greedy_generate,
)
from workbench.ms.model import Tensor  # noqa: E402

LOGIT_TOL = 1e-5
PROMPTS = ["def ", "12 + 35 =", "U"]  # 4, 9 and 1 bytes: one left-padded batch
NEW = 8


@pytest.fixture(scope="module")
def models(small_cfg):
    torch.manual_seed(0)
    tm = MoELM(small_cfg).eval()
    return tm, from_torch(tm)


@pytest.fixture(scope="module")
def pynative(models):
    tm, mm = models
    return generation_parity(tm, PROMPTS, NEW, mode="pynative", ms_model=mm)


def assert_matches_torch(report):
    assert report.max_new_tokens == NEW and len(report.prompts) == len(PROMPTS)
    for row in report.prompts:
        assert len(row.ms_tokens) == len(row.torch_tokens) == NEW
        # equal tokens, or a first difference at a near tie of PyTorch's logits (gap checked here too)
        assert row.equal or (row.at_near_tie and row.top2_gap <= NEAR_TIE_LOGIT), report.format()
        assert row.max_logit_diff <= LOGIT_TOL, report.format()


def test_ms_greedy_tokens_equal_pytorch(pynative):
    assert_matches_torch(pynative)
    assert pynative.passed


def test_ms_cache_equals_ms_full_forward_at_every_position(models):
    """The cached logits of every prompt and generated position against MindSpore's own uncached
    forward of each sequence alone (no padding): proves the cache, the left padding and the offsets."""
    _, mm = models
    out = ms_greedy_decode(mm, PROMPTS, NEW, mode="pynative")
    assert ms_greedy_generate(mm, PROMPTS, NEW) == out.new_tokens
    P = max(len(p) for p in PROMPTS)
    for b, text in enumerate(out.tokens):
        n = len(out.prompt_tokens[b])
        cached = np.concatenate([out.prefill_logits[b, P - n:], out.step_logits[1:, b]])  # positions 0 .. len-2
        full = mm(Tensor(np.array([text[:-1]], np.int32)))[1].asnumpy()[0]
        assert cached.shape == full.shape
        assert np.abs(cached - full).max() <= LOGIT_TOL
        assert (full[n - 1:].argmax(-1) == np.array(out.new_tokens[b])).all()  # greedy on the full forward too


def test_graph_mode_gives_the_pynative_tokens(models, pynative):
    tm, mm = models
    graph = generation_parity(tm, PROMPTS, NEW, mode="graph", ms_model=mm)
    assert [r.ms_tokens for r in graph.prompts] == [r.ms_tokens for r in pynative.prompts]
    assert_matches_torch(graph)


def test_generation_stops_at_the_context(models, small_cfg):
    _, mm = models
    out = ms_greedy_decode(mm, ["12 + 35 ="], 100)
    assert out.stopped_at_context and len(out.new_tokens[0]) == small_cfg.seq_len - 9
    with pytest.raises(ValueError, match="max_new_tokens=0 is invalid"):
        ms_greedy_generate(mm, ["a"], 0)
    with pytest.raises(ValueError, match="mode='eager' is invalid"):
        ms_greedy_generate(mm, ["a"], 1, mode="eager")


def test_report_catches_an_injected_divergence_at_its_first_step(models, pynative, small_cfg):
    """MindSpore's embedding of a token PyTorch first generates at step j (in a prompt's continuation)
    is pointed at the LM head's row of another token u: steps 0..j see the same inputs, step j + 1
    is the first fed that token, and MindSpore then picks u. The report names step j + 1, no near tie."""
    tm, _ = models
    b, row = next((b, r) for b, r in enumerate(pynative.prompts)
                  if any(t not in r.prompt_tokens and t not in r.torch_tokens[:j]
                         for j, t in enumerate(r.torch_tokens[1:NEW - 1], start=1)))
    j = next(j for j, t in enumerate(row.torch_tokens[1:NEW - 1], start=1)
             if t not in row.prompt_tokens and t not in row.torch_tokens[:j])
    token = row.torch_tokens[j]
    u = next(t for t in range(small_cfg.vocab_size) if t != row.torch_tokens[j + 1])
    wrong = from_torch(tm)
    embed = wrong.embed.asnumpy()
    embed[token] = 50.0 * wrong.lm_head.asnumpy()[u]
    wrong.embed.set_data(Tensor(embed))

    report = generation_parity(tm, PROMPTS, NEW, mode="pynative", ms_model=wrong)
    got = report.prompts[b]
    assert got.first_divergence == j + 1 and got.ms_tokens[j + 1] == u, report.format()
    assert got.ms_tokens[:j + 1] == got.torch_tokens[:j + 1]
    assert got.top2_gap > NEAR_TIE_LOGIT and not got.at_near_tie and not report.passed
    assert got.max_logit_diff <= LOGIT_TOL < got.diff_at_divergence  # the steps before agree; this one does not
    assert "FAIL" in report.format()


def test_a_divergence_at_a_near_tie_passes():
    common = dict(prompt_tokens=[1], torch_tokens=[5, 6, 7], max_logit_diff=3e-7, min_top2_gap=2e-5)
    tie = PromptParity(ms_tokens=[5, 8, 7], first_divergence=1, top2_gap=2e-5, diff_at_divergence=3e-7, **common)
    assert tie.at_near_tie and tie.passed
    real = PromptParity(ms_tokens=[5, 8, 7], first_divergence=1, top2_gap=2e-3, diff_at_divergence=1e-2, **common)
    assert not real.at_near_tie and not real.passed
    assert NEAR_TIE_LOGIT == 1e-4


def test_cli_generation_parity_writes_its_report(tmp_path, capsys):
    out = tmp_path / "gen.json"
    rc = main(["parity", "--generate", "--mode", "pynative", "--max-new-tokens", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "generation parity (pynative, 2 greedy tokens" in text and "PASS" in text
    report = json.loads(out.read_text())
    assert report["passed"] and [r["mode"] for r in report["reports"]] == ["pynative"]
    assert {p["prompt"] for p in report["reports"][0]["prompts"]} == {"def ", "The ", "12 + 35 =", "U+00"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-new-tokens", "0"], "--max-new-tokens=0 is invalid: must be >= 1"),
    (["--max-new-tokens", "500"], "--max-new-tokens=500 is invalid: the longest parity prompt"),
    (["--mode", "eager"], "--mode='eager' is invalid"),
    (["--router", "uniform"], "router='uniform' cannot generate token by token"),
    (["--router", "hash"], "router='hash' is invalid"),
    (["--run-dir", "/nonexistent/run"], "/nonexistent/run does not exist"),
    (["--run-dir", "/nonexistent/run", "--preset", "tiny"], "--preset and --run-dir both choose the model"),
    (["--curve-steps", "3"], "--curve-steps applies to the operator suite"),
])
def test_cli_bad_values_are_one_line(argv, message, capsys):
    assert main(["parity", "--generate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_cli_generation_flags_need_generate(capsys):
    assert main(["parity", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-new-tokens applies to --generate" in err


@pytest.mark.parametrize("over", [
    # DeepSeek-V3 routing (groups, route scale, a loss-free bias) under a capacity dispatch, which decode
    # runs dropless; a gated shared expert; tied embeddings
    {"moe": {"router": "sigmoid", "num_groups": 4, "topk_groups": 2, "route_scale": 2.5, "dispatch": "capacity",
             "capacity_factor": 1.0, "bias_update_rate": 1e-3, "num_shared_experts": 1, "shared_expert_gate": True},
     "tie_embeddings": True},
    {"first_dense_layers": 1},  # a dense block before the MoE one
])
def test_other_configs_decode_as_pytorch(small_cfg, over):
    import dataclasses

    moe = dataclasses.replace(small_cfg.moe, **over.pop("moe", {}))
    cfg = small_cfg.replace(moe=moe, **over)
    torch.manual_seed(1)
    tm = MoELM(cfg).eval()
    with torch.no_grad():  # a selection bias that takes part
        for layer in tm.moe_layers():
            if layer.router.bias is not None:
                layer.router.bias.copy_(torch.randn(layer.router.bias.shape) * 1e-2)
    report = generation_parity(tm, PROMPTS, 6)
    assert report.max_new_tokens == 6
    for row in report.prompts:
        assert row.equal or row.at_near_tie, report.format()
        assert row.max_logit_diff <= LOGIT_TOL, report.format()
