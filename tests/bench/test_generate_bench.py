"""`workbench bench generate`: the bench returns every field on a small model, the uniform-routing
expectation of distinct experts matches a Monte-Carlo count, the distinct-experts count of the routing
records matches an independent count, and bad flags exit 2 with one line. Speed is measured by the
benchmark, never asserted here."""

from __future__ import annotations

import inspect
import json
import statistics

import pytest
import torch

from workbench.bench.generate import (
    GenerateBenchConfig,
    bench_generate,
    distinct_experts_per_position,
    distinct_experts_per_step,
    format_generate_bench,
    make_prompts,
    uniform_distinct_experts,
)
from workbench.config import MoEConfig, preset
from workbench.inference import generate
from workbench.model import MoELM


def small_model(seed: int = 0) -> MoELM:
    """A model of a few thousand parameters and a 24-token context: each generation is milliseconds."""
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(seq_len=24, d_model=32, n_layers=2, n_heads=2, dense_hidden=64,
                                 moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
    return MoELM(cfg)


def test_the_bench_returns_every_field_and_serialises_to_json():
    model = small_model()
    threads = torch.get_num_threads()
    result = bench_generate(model, batch_sizes=(1, 3), prompt_len=4, repeats=2, warmup=1, recompute_cap=5,
                            distinct_batch_sizes=(1, 2), distinct_new_tokens=4, threads=1)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert {"torch", "threads", "cpu", "date", "load_average"} <= set(data["environment"])
    assert data["environment"]["threads"] == 1
    assert data["model"]["seq_len"] == 24 and data["model"]["num_experts"] == 4
    assert data["settings"]["batch_sizes"] == [1, 3]
    assert [row["batch"] for row in data["rows"]] == [1, 3]
    for row in data["rows"]:
        assert row["prefill"]["tokens"] == row["batch"] * 4 and row["prefill"]["tokens_per_s"] > 0
        assert len(row["prefill"]["ms_rounds"]) == 2
        cached, recompute = row["cached"], row["recompute"]
        assert cached["new_tokens"] == 20  # to the full context
        for variant in (cached, recompute):
            assert variant["decode_tokens_per_s"] > 0 and variant["generate_tokens_per_s"] > 0
            assert variant["step_ms_median"] > 0 and variant["first_token_ms_median"] > 0
            assert len(variant["decode_tokens_per_s_rounds"]) == 2
        # the ratio is per round, then the median
        assert row["speedup_rounds"] == pytest.approx([c / r for c, r in zip(
            cached["decode_tokens_per_s_rounds"], recompute["decode_tokens_per_s_rounds"], strict=True)])
        assert row["speedup"] == pytest.approx(statistics.median(row["speedup_rounds"]))
        assert row["tokens_agree"]  # greedy: the cache changes the cost, not the tokens
    # batch 1 (the headline) is never capped; batch 3 is, and the notes say so
    assert not data["rows"][0]["recompute"]["capped"] and data["rows"][0]["recompute"]["new_tokens"] == 20
    assert data["rows"][1]["recompute"]["capped"] and data["rows"][1]["recompute"]["new_tokens"] == 5
    assert any("capped at 5" in note for note in data["notes"])
    assert [d["batch"] for d in data["distinct_experts"]] == [1, 2]
    assert torch.get_num_threads() == threads and model.training  # the run leaves both as they were
    text = format_generate_bench(result)
    assert "speedup" in text and "distinct experts per decode step" in text and "5*" in text


def test_the_config_is_the_bench_s_arguments_and_spells_its_command():
    cfg = GenerateBenchConfig(preset="tiny", batch_sizes=(2,), recompute_cap=None, threads=1)
    assert set(cfg.bench_kwargs()) | {"preset"} == set(GenerateBenchConfig.__dataclass_fields__)
    params = inspect.signature(bench_generate).parameters
    assert set(cfg.bench_kwargs()) == set(params) - {"preset_or_model", "log"}
    assert all(params[name].default == value or isinstance(value, tuple)
               for name, value in GenerateBenchConfig().bench_kwargs().items())
    command = cfg.command("out.json")
    assert command.startswith("workbench bench generate --preset tiny --batch-sizes 2 ")
    assert "--recompute-cap none" in command and command.endswith("--json out.json")


@pytest.mark.parametrize("num_experts, top_k, batch", [(8, 2, 1), (8, 2, 3), (16, 2, 8), (16, 4, 5), (64, 6, 16)])
def test_the_uniform_expectation_equals_a_monte_carlo_count(num_experts, top_k, batch):
    """Each of B tokens picks k distinct experts uniformly (the first k of a random permutation);
    the mean count of distinct experts over 20,000 trials must be within 5 standard errors of
    E(1 - (1 - k/E)^B) (standard error: the counts' sd / sqrt(trials), below 0.02 in these cases,
    so the tolerance is below 0.1 experts; with the seed fixed the draw is the same every run)."""
    trials = 20_000
    g = torch.Generator().manual_seed(0)
    # shape: (trials, B, k): k experts without replacement per token
    picks = torch.rand(trials, batch, num_experts, generator=g).argsort(dim=-1)[..., :top_k]
    touched = torch.zeros(trials, num_experts, dtype=torch.bool)
    touched.scatter_(1, picks.reshape(trials, -1), True)
    counts = touched.sum(dim=1).float()
    standard_error = counts.std().item() / trials ** 0.5
    assert standard_error < 0.02
    assert counts.mean().item() == pytest.approx(uniform_distinct_experts(num_experts, top_k, batch),
                                                 abs=5 * standard_error)


def test_the_uniform_expectation_at_its_ends():
    assert uniform_distinct_experts(16, 2, 1) == pytest.approx(2)  # one token: its k experts
    assert uniform_distinct_experts(16, 2, 0) == 0
    assert uniform_distinct_experts(16, 16, 3) == pytest.approx(16)  # every token takes all
    assert uniform_distinct_experts(16, 2, 10_000) == pytest.approx(16)
    with pytest.raises(ValueError, match="top_k=17 is invalid"):
        uniform_distinct_experts(16, 17, 1)


def independent_count(expert_ids_BNK: torch.Tensor, start: int) -> list[int]:
    """Distinct experts per position from start on, with Python sets (expert -1 left out)."""
    B, N, K = expert_ids_BNK.shape
    return [len({int(e) for b in range(B) for e in expert_ids_BNK[b, n] if e >= 0}) for n in range(start, N)]


def test_distinct_experts_of_a_hand_made_routing():
    # 3 sequences, 2 prompt positions then 3 decode steps, top-2 of 6 experts; -1: a finished sequence
    expert_ids = torch.tensor([
        [[0, 1], [2, 3], [0, 1], [4, 5], [5, 0]],
        [[0, 1], [2, 3], [1, 0], [4, 5], [-1, -1]],
        [[5, 4], [3, 2], [2, 3], [3, 4], [1, 2]],
    ])
    counts = distinct_experts_per_position(expert_ids, 2, 6)
    assert counts.tolist() == independent_count(expert_ids, 2) == [4, 3, 4]
    # a random routing with holes, against the same count
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, 16, (7, 30, 3), generator=g)
    assert distinct_experts_per_position(ids, 5, 16).tolist() == independent_count(ids, 5)


def test_distinct_experts_per_step_counts_the_decode_steps_of_the_routing_records():
    model = small_model()
    rows = distinct_experts_per_step(model, batch_sizes=(1, 3), prompt_len=4, new_tokens=6)
    assert [r["batch"] for r in rows] == [1, 3]
    assert rows[0]["per_layer"] == [2.0, 2.0]  # one token: exactly its top-2
    # the same generation, counted from its records independently
    result = generate(model, make_prompts(3, 4, 0), 6, record_routing=True)
    expected = [sum(independent_count(layer.expert_ids, 4)) / 6 for layer in result.routing]
    assert rows[1]["per_layer"] == pytest.approx(expected)
    assert rows[1]["mean"] == pytest.approx(sum(expected) / len(expected))
    assert rows[1]["uniform"] == pytest.approx(4 * (1 - (1 - 2 / 4) ** 3))
    assert rows[1]["vs_uniform"] == pytest.approx(rows[1]["mean"] / rows[1]["uniform"])


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    from workbench.cli import main

    try:
        status = main(args)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    (["--batch-sizes", "0"], "batch_sizes=0 is invalid"),
    (["--batch-sizes", ""], "batch_sizes=() is invalid"),
    (["--batch-sizes", "x"], "--batch-sizes"),
    (["--batch-sizes", "1000000000"], "batch_sizes=1000000000 is invalid: a KV cache of"),
    (["--distinct-batch-sizes", "-2"], "distinct_batch_sizes=-2 is invalid"),
    (["--prompt-len", "0"], "prompt_len=0 is invalid"),
    (["--prompt-len", "255"], "prompt_len=255 is invalid: must leave at least 2 tokens"),
    (["--preset", "tiny", "--prompt-len", "127"], "prompt_len=127 is invalid"),
    (["--repeats", "0"], "repeats=0 is invalid"),
    (["--warmup", "-1"], "warmup=-1 is invalid"),
    (["--recompute-cap", "1"], "recompute_cap=1 is invalid"),
    (["--distinct-new-tokens", "300"], "distinct_new_tokens=300 is invalid"),
    (["--threads", "0"], "threads=0 is invalid"),
    (["--seed", "-1"], "seed=-1 is invalid"),
    (["--preset", "huge"], "--preset"),
])
def test_bad_values_exit_2_with_one_line_naming_the_flag(flags, needle, capsys):
    status, err = run_cli(["bench", "generate", *flags], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
