"""``workbench.inference.evaluate``: held-out arithmetic problems, greedy exact match, and bits per byte,
each checked against an independent computation on a run the real CLI trained (5 steps of a micro model)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import workbench
from tests.train.conftest import MICRO_FLAGS
from workbench.data import LMData
from workbench.data.corpus import Corpus, Document
from workbench.inference import generate
from workbench.inference.evaluate import (
    ArithmeticProblem,
    arithmetic_exact_match,
    arithmetic_problems,
    data_for_run,
    domain_bits_per_byte,
    evaluate,
    split_problem,
)

NEWLINE = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A micro run of the built-in corpus (small budget), trained for 5 steps with ``workbench train``."""
    from workbench.cli import main

    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("MPLBACKEND", "Agg")
        code = main(["train", *MICRO_FLAGS, "--steps", "5", "--max-bytes-per-domain", "60000", "--no-progress",
                     "--run-dir", str(run_dir)])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def model(run):
    return workbench.load_model(run)


@pytest.fixture(scope="module")
def data(run):
    return data_for_run(run)


# --- problems ---------------------------------------------------------------------------------


def test_a_line_splits_at_its_first_equals_sign():
    assert split_problem("12 + 35 = 47") == ArithmeticProblem("12 + 35 =", " 47")
    assert split_problem("5 - 77 = -72") == ArithmeticProblem("5 - 77 =", " -72")
    # two steps: the answer is the rest of the line, the intermediate step included
    assert split_problem("(3 + 4) * 5 = 7 * 5 = 35") == ArithmeticProblem("(3 + 4) * 5 =", " 7 * 5 = 35")
    assert split_problem("") is None and split_problem("no equation here") is None
    assert split_problem("12 + 35 =") is None  # nothing to answer


def _hand_corpus() -> Corpus:
    math_docs = [Document(f"math/{i}", "math", f"{i} + 1 = {i + 1}\n({i} + 2) * 3 = {i + 2} * 3 = {(i + 2) * 3}\n",
                          "hand-written") for i in range(6)]
    prose = [Document(f"prose/{i}", "prose", "a few words of prose to fill a window. " * 3, "hand-written")
             for i in range(3)]
    return Corpus(["prose", "math"], prose + math_docs)


def test_problems_are_the_validation_split_lines_in_stream_order():
    corpus = _hand_corpus()
    data = LMData(corpus, seq_len=8, batch_size=2, val_fraction=0.4)
    train, val = corpus.split(0.4)
    val_math = [d for d in val.documents if d.domain == "math"]
    train_math = [d for d in train.documents if d.domain == "math"]
    assert val_math and train_math
    expected = [split_problem(line) for doc in val_math for line in doc.text.splitlines()]
    problems = arithmetic_problems(data, n=100)
    assert problems == expected
    train_lines = {line for doc in train_math for line in doc.text.splitlines()}
    assert not {p.prompt + p.answer for p in problems} & train_lines  # none from the train split
    assert arithmetic_problems(data, n=1) == expected[:1]


def test_data_without_math_is_refused_naming_it():
    corpus = _hand_corpus()
    prose_only = Corpus(["prose"], [d for d in corpus.documents if d.domain == "prose"])
    with pytest.raises(ValueError, match=r"^data=.*has no 'math' domain"):
        arithmetic_problems(LMData(prose_only, seq_len=8, val_fraction=0.4))
    with pytest.raises(ValueError, match="^n=0 is invalid"):
        arithmetic_problems(LMData(corpus, seq_len=8, val_fraction=0.4), n=0)


def test_the_runs_problems_come_from_its_math_validation_documents(data):
    problems = arithmetic_problems(data, n=20)
    assert len(problems) == 20
    _, val = data.corpus.split(data.val_fraction)
    val_lines = [line for d in val.documents if d.domain == "math" for line in d.text.splitlines()]
    assert [p.prompt + p.answer for p in problems] == val_lines[:20]
    assert all(p.prompt.endswith(" =") and p.answer.startswith(" ") for p in problems)


def test_data_for_run_rebuilds_the_runs_data(data, model):
    assert data.seq_len == model.cfg.seq_len == 32
    assert data.batch_size == 4 and data.val_windows_per_domain == 2  # from MICRO_FLAGS
    assert list(data.domains) == ["code", "prose", "math", "records"]


# --- exact match ------------------------------------------------------------------------------


def test_exact_match_agrees_with_an_independent_loop(model, data):
    problems = arithmetic_problems(data, n=5)
    result = arithmetic_exact_match(model, problems, batch_size=3)  # two batches, the second short
    got = []
    for p in problems:  # one at a time, unpadded: room for the answer and its newline, cut at the newline
        budget = min(len(p.answer.encode()) + 1, model.cfg.seq_len - len(p.prompt.encode()))
        got.append(generate(model, p.prompt, budget, stop="\n", record_routing=False).texts[0])
    correct = sum(g == p.answer for g, p in zip(got, problems, strict=True))
    assert (result.correct, result.total) == (correct, 5)
    assert result.accuracy == correct / 5
    assert result.examples == [(p.prompt, p.answer, g) for p, g in zip(problems[:5], got, strict=False)]


def _always_newline(model):
    """A copy of ``model`` whose every next-byte logit is 0 but that of "\\n", which is positive, so
    greedy decoding ends the line at once: residual dimension 0 is made large and positive (the
    embedding), the final norm keeps only it, and the head maps it to "\\n" alone."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.embed.weight[:, 0] = 1e3
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[NEWLINE, 0] = 1.0
    return model


def test_exact_match_counts_right_and_wrong_answers(model):
    newline_model = _always_newline(model)
    assert generate(newline_model, "7 + 1 =", 3, stop="\n").texts == [""]
    problems = [ArithmeticProblem("7 + 1 =", ""), ArithmeticProblem("7 + 1 =", " 8"), ArithmeticProblem("2 * 3 =", ""),
                ArithmeticProblem("(1 + 2) * 3 =", " 3 * 3 = 9")]
    result = arithmetic_exact_match(newline_model, problems, batch_size=3)
    assert (result.correct, result.total, result.accuracy) == (2, 4, 0.5)
    assert [got for _, _, got in result.examples] == ["", "", "", ""]


# --- bits per byte ----------------------------------------------------------------------------


def test_bits_per_byte_is_mean_cross_entropy_over_ln2(model, data):
    model.train()  # the flag is given back
    bits = domain_bits_per_byte(model, data)
    assert model.training
    model.eval()
    with torch.no_grad():
        for domain, batches in data.val_batches().items():
            losses = [F.cross_entropy(model(b.tokens).logits.flatten(0, 1), b.targets.flatten(), reduction="none")
                      for b in batches]
            assert bits[domain] == pytest.approx(torch.cat(losses).mean().item() / math.log(2), rel=1e-6)
    assert set(bits) == set(data.val_batches())
    first = domain_bits_per_byte(model, data, max_batches=1)
    with torch.no_grad():
        b = data.val_batches()["math"][0]
        ce = F.cross_entropy(model(b.tokens).logits.flatten(0, 1), b.targets.flatten())
    assert first["math"] == pytest.approx(ce.item() / math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="^max_batches=0 is invalid"):
        domain_bits_per_byte(model, data, max_batches=0)


def test_evaluate_reports_both(model, data):
    report = evaluate(model, data, n_problems=3, max_batches=1)
    assert report.bits_per_byte == domain_bits_per_byte(model, data, max_batches=1)
    assert report.arithmetic.total == 3 and report.arithmetic_missing is None
    assert all(0 < b < 9 for b in report.bits_per_byte.values())  # about 8 bits: 5 steps from uniform
