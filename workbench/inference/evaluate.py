"""What a trained model knows: validation bits per byte per domain, and arithmetic it can finish.

    data = data_for_run("runs/demo")                  # the run's own corpus and validation split
    report = evaluate(load_model("runs/demo"), data)
    report.bits_per_byte                              # {"code": 2.1, "prose": 2.4, "math": 1.3, ...}
    report.arithmetic.accuracy                        # greedy exact match on held-out problems

Two measures, one per question:

- **bits per byte** (``domain_bits_per_byte``): how well the model predicts each domain's held-out
  text. A token is a byte (``ByteTokenizer``), so the mean next-token cross entropy in nats divided
  by ln 2 is bits per byte, comparable across tokenizers and with compressors (gzip reaches about
  2 to 3 on prose). It reuses the validation windows the trainer reports its losses on.
- **arithmetic exact match** (``arithmetic_exact_match``): whether the model *generates* the right
  answer to a problem it has never seen, greedily, token by token through the KV cache
  (``workbench.inference.generate``). The problems are the lines of the ``math`` domain's
  validation documents (``arithmetic_problems``), which training never read: the built-in corpus
  splits by document (``Corpus.split``).

Shape legend: B windows of a batch, S sequence length, V vocabulary.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.inference.generation import DecodeRefused, generate
from workbench.validation import check

MATH_DOMAIN = "math"
NUM_EXAMPLES = 5  # problems kept in ArithmeticResult.examples
NEWLINE = 10  # the byte that ends a problem's line


@dataclass(frozen=True)
class ArithmeticProblem:
    prompt: str  # the line up to and including its first " =", e.g. "12 + 35 ="
    answer: str  # the rest of the line, e.g. " 47", or " 12 + 70 = 82" for a two-step problem


@dataclass
class ArithmeticResult:
    accuracy: float  # correct / total
    correct: int
    total: int
    examples: list[tuple[str, str, str]]  # (prompt, expected, got) of the first few problems


@dataclass
class EvalReport:
    bits_per_byte: dict[str, float]  # per validation domain
    arithmetic: ArithmeticResult | None  # None when it cannot be measured: see arithmetic_missing
    arithmetic_missing: str | None = None  # why there is no arithmetic result (no math domain, a router...)


def split_problem(line: str) -> ArithmeticProblem | None:
    """A corpus line ``"12 + 35 = 47"`` as ``ArithmeticProblem("12 + 35 =", " 47")``; None for a
    line without ``" ="`` or without anything after it (a blank line, a document's end)."""
    at = line.find(" =")
    if at <= 0 or not line[at + 2:]:
        return None
    return ArithmeticProblem(line[:at + 2], line[at + 2:])


def arithmetic_problems(data: Any, n: int = 200) -> list[ArithmeticProblem]:
    """The first ``n`` problems of the ``math`` domain's validation text, in stream order.

    ``data``: the ``LMData`` a run trains on (``data_for_run``); its validation stream (``data.val``)
    is what ``val_batches`` reads, documents the training split never holds.

    The prompt is the line up to and including its first ``" ="``; the answer is the rest of the
    line, so a two-step line ``"(3 + 4) * 5 = 7 * 5 = 35"`` asks for ``" 7 * 5 = 35"``. Why the
    whole rest rather than the final number: it is exactly what the corpus teaches the model to
    write after the first ``" ="``, so a match needs no parsing of the model's output, and a right
    number reached through a wrong intermediate step does not count.

    ``ValueError`` naming ``data`` when it has no ``math`` domain or no problem in its validation
    text; ``n`` must be an integer >= 1 (fewer problems are returned when the split holds fewer).
    """
    check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "n", "must be an integer >= 1", n)
    domains = list(data.domains)
    check(MATH_DOMAIN in domains, "data", f"has no {MATH_DOMAIN!r} domain (its domains: {', '.join(domains)}): "
          "arithmetic problems come from the built-in corpus", type(data).__name__)
    lo, hi = data.val.domain_ranges[domains.index(MATH_DOMAIN)].tolist()
    text = bytes(data.val.tokens[lo:hi].tolist()).decode("utf-8", errors="replace")
    problems = []
    for line in text.split("\n"):
        if (problem := split_problem(line)) is not None:
            problems.append(problem)
            if len(problems) == n:
                break
    check(bool(problems), "data", f"holds no arithmetic line ('<expression> = <answer>') in its {MATH_DOMAIN!r} "
          "validation text", type(data).__name__)
    return problems


def arithmetic_exact_match(model: torch.nn.Module, problems: list[ArithmeticProblem], *,
                           batch_size: int = 64) -> ArithmeticResult:
    """Greedy-decode every prompt, ``batch_size`` at a time, and count the answers that equal the
    expected one exactly (the generated text up to the newline that ends the line).

    Each problem gets one byte more than its expected answer: room for the answer and its newline,
    and no more, since a longer answer is wrong anyway (``got`` is that many bytes at most, whatever
    the batch). A continuation that has not ended its line by then is wrong; so is a problem whose
    prompt and answer do not fit in the model's context (``seq_len``). ``DecodeRefused`` for a
    router that cannot decode token by token.
    """
    check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1, "batch_size",
          "must be an integer >= 1", batch_size)
    check(len(problems) >= 1, "problems", "is empty: give at least one ArithmeticProblem", problems)
    seq_len = model.cfg.seq_len
    got: list[str] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        prompt_bytes = [p.prompt.encode("utf-8") for p in batch]
        # each problem's budget: its answer and the newline after it
        budgets = [len(p.answer.encode("utf-8")) + 1 for p in batch]
        # a prompt that fills the context cannot be continued at all: it counts as wrong
        fits = [len(b) < seq_len for b in prompt_bytes]
        fitting = [b for b, ok in zip(prompt_bytes, fits, strict=True) if ok]
        continuations = iter(_greedy(model, fitting, max(budgets)) if fitting else [])
        for ok, budget in zip(fits, budgets, strict=True):
            new = next(continuations) if ok else []
            # cut to the problem's own budget, so that what it got does not depend on its batch
            line = new[:budget]
            line = line[:line.index(NEWLINE)] if NEWLINE in line else line
            got.append(bytes(line).decode("utf-8", errors="replace"))
    correct = sum(g == p.answer for g, p in zip(got, problems, strict=True))
    examples = [(p.prompt, p.answer, g) for p, g in zip(problems[:NUM_EXAMPLES], got, strict=False)]
    return ArithmeticResult(correct / len(problems), correct, len(problems), examples)


def _greedy(model: torch.nn.Module, prompts: list[bytes], max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation (token ids) of each prompt, ending at its newline, within
    ``max_new_tokens`` and the model's context."""
    room = model.cfg.seq_len - max(len(p) for p in prompts)
    result = generate(model, prompts, min(max_new_tokens, room), stop="\n", record_routing=False)
    return result.new_tokens


def domain_bits_per_byte(model: torch.nn.Module, data: Any, *, max_batches: int | None = None) -> dict[str, float]:
    """Mean next-byte cross entropy of each domain's validation windows, in bits per byte.

    ``data.val_batches()`` gives the windows (those the trainer's validation losses use); each
    domain reads at most ``max_batches`` of its batches (None: all). The model runs in evaluation
    mode under ``torch.no_grad``, in its own dtype, and gets its training flag back afterwards.
    """
    check(max_batches is None or (isinstance(max_batches, int) and not isinstance(max_batches, bool)
                                  and max_batches >= 1), "max_batches", "must be an integer >= 1, or None for all",
          max_batches)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bits: dict[str, float] = {}
    try:
        with torch.no_grad():
            for domain, batches in data.val_batches().items():
                nats, count = 0.0, 0
                for batch in batches[:max_batches]:
                    targets_BS = batch.targets.to(device)
                    logits_BSV = model(batch.tokens.to(device)).logits
                    # fp32 and summed: a mean over windows of unequal counts would weigh tokens unequally
                    nats += F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten(),
                                            reduction="sum").item()
                    count += targets_BS.numel()
                if count:
                    bits[domain] = nats / count / math.log(2)
    finally:
        model.train(was_training)
    return bits


def evaluate(model: torch.nn.Module, data: Any, *, n_problems: int = 200,
             max_batches: int | None = None) -> EvalReport:
    """``domain_bits_per_byte`` and ``arithmetic_exact_match`` on ``n_problems`` held-out problems.

    The arithmetic is ``None``, with the reason in ``arithmetic_missing``, where it cannot be
    measured: data without a ``math`` domain (a run on the user's own text), or a router that
    cannot decode token by token (``DecodeRefused``); the bits per byte are there either way.
    """
    bits = domain_bits_per_byte(model, data, max_batches=max_batches)
    if MATH_DOMAIN not in list(data.domains):
        return EvalReport(bits, None, f"the data has no {MATH_DOMAIN!r} domain (its domains: "
                                      f"{', '.join(data.domains)})")
    try:
        arithmetic = arithmetic_exact_match(model, arithmetic_problems(data, n_problems))
    except DecodeRefused as err:
        return EvalReport(bits, None, str(err))
    return EvalReport(bits, arithmetic)


def data_for_run(run_dir: str | Path) -> Any:
    """The ``LMData`` a run trained on, rebuilt from the configs it recorded (``run.json``, else its
    newest usable checkpoint): the same corpus, split, sequence length and validation windows.

    ``run_dir``: a run directory, or one of its checkpoint files. ``CheckpointError`` when there is
    no run there; ``ValueError`` when its data cannot be rebuilt (a ``--data`` path that is gone).
    A warning when the data differs from the fingerprint the run recorded (its files changed).
    """
    from workbench.train.checkpoint import CheckpointError, latest_usable_checkpoint, list_checkpoints
    from workbench.train.config import TrainConfig
    from workbench.train.rundir import check_run_info, read_run_info
    from workbench.train.trainer import build_data, data_fingerprint

    path = Path(run_dir).expanduser()
    run_dir = path if path.is_dir() else path.parent
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory (e.g. runs/demo) or one of its "
                              "checkpoint files")
    info = read_run_info(run_dir)
    if info is not None:
        try:
            check_run_info(run_dir, info)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        model_config, train_config = info["model_config"], info["train_config"]
    else:  # a run from before run.json: its checkpoints record the same configs
        if not list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} holds neither run.json nor a checkpoint: it is not a run directory")
        ckpt, skipped = latest_usable_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"no usable checkpoint in {run_dir}: {'; '.join(skipped)}")
        model_config, train_config = ckpt.model_config, ckpt.train_config
    cfg = TrainConfig.from_dict(train_config)
    data = build_data(cfg, int(model_config["seq_len"]))
    recorded = (info or {}).get("data_fingerprint")
    if recorded is not None and data_fingerprint(cfg, data) != recorded:
        warnings.warn(f"the data of {run_dir} differs from what the run trained on (its fingerprint in run.json): "
                      "the scores are on the data as it is now", stacklevel=2)
    return data
