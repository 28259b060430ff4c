"""``generate``: text from a trained ``MoELM``, with a KV cache and the routing of every token.

    result = generate(model, ["def add(a, b):", "12 + 35 ="], max_new_tokens=40)
    result.texts                         # the generated continuations
    result.routing[0].expert_ids         # (B, N, K): the experts of every token in the first MoE layer

    for step in stream_generate(model, "Once", max_new_tokens=100, temperature=0.8, seed=0):
        print(step.text[0], end="")      # one byte per step, as it is chosen

How: the prompts are left-padded into one batch and run once through the model (the *prefill*),
which fills the KV cache (``workbench.inference.cache``); then every step samples one token per
sequence (``workbench.inference.sampling``) and feeds it back alone (*decode*), attending to the
cached keys and values instead of recomputing the prefix. ``MoELM.forward_cached`` runs both.

The model runs in evaluation mode, each MoE layer with its dispatch's dropless form
(``dispatch.dropless_form``: a decode step has no batch of tokens for capacity to count) and the
router's evaluation behaviour. A router whose routing of a token depends on other tokens cannot
be decoded token by token, and ``Router.decode_refusal`` says why (``DecodeRefused``).

Routing records: every token the model reads (prompt, and each generated token when it is fed
back) has its experts, gates and router scores recorded per MoE layer, as the training forward's
``RoutingInfo`` records them. The last generated token is fed once more so its routing is known
too (``record_routing=False`` skips that step).

Shape legend: B sequences, P longest prompt, N tokens of a sequence (prompt + generated),
K experts per token, E experts, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from workbench.data.tokenizer import ByteTokenizer
from workbench.inference.cache import KVCache
from workbench.inference.sampling import SamplingConfig, sample
from workbench.validation import check

Prompt = str | bytes | Sequence[int]
_TOKENIZER = ByteTokenizer()


class DecodeRefused(ValueError):
    """The model has a router that cannot generate token by token (``Router.decode_refusal``)."""


def decode_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot generate token by token, naming the router; None when it can."""
    for index, layer in enumerate(model.moe_layers()):
        reason = type(layer.router).decode_refusal(layer.cfg)
        if reason is not None:
            return f"router={layer.cfg.router!r} (MoE layer {index}) cannot generate token by token: {reason}"
    return None


@dataclass
class GenerationStep:
    """One step of ``stream_generate``: the token chosen for each sequence."""

    index: int  # 0 for the first generated token
    tokens: list[int]  # the token of each sequence; -1 where the sequence had already stopped
    finished: list[bool]  # whether the sequence has stopped (at its stop byte, this step included)

    @property
    def text(self) -> list[str]:
        """Each sequence's new byte as text ('' where it had stopped). A multi-byte character comes
        one byte at a time; ``GenerationResult.texts`` decodes whole sequences."""
        return [_TOKENIZER.decode([t]) if t >= 0 else "" for t in self.tokens]


@dataclass
class LayerRouting:
    """The routing of every token of every sequence in one MoE layer, aligned with
    ``GenerationResult.tokens``: position j of sequence b is its j-th token (prompt first).
    Positions beyond a sequence's length hold expert -1 and gate 0."""

    block: int  # index of the transformer block this MoE layer is in
    expert_ids: torch.Tensor  # (B, N, K) long
    gates: torch.Tensor  # (B, N, K) fp32: combine weights
    scores: torch.Tensor  # (B, N, E) fp32: router probabilities or affinities of every expert


@dataclass
class GenerationResult:
    prompt_tokens: list[list[int]]
    new_tokens: list[list[int]]  # generated ids of each sequence, its stop byte included
    stopped: list[bool]  # True where the sequence ended at its stop byte, False at max_new_tokens
    routing: list[LayerRouting] = field(default_factory=list)  # one per MoE layer, in depth order

    @property
    def texts(self) -> list[str]:
        """The generated text of each sequence, without its stop byte."""
        return [_TOKENIZER.decode(new[:-1] if stop else new)
                for new, stop in zip(self.new_tokens, self.stopped, strict=True)]

    @property
    def tokens(self) -> list[list[int]]:
        """Prompt and generated ids of each sequence: what ``routing`` is aligned with."""
        return [p + n for p, n in zip(self.prompt_tokens, self.new_tokens, strict=True)]


def encode_prompts(prompts: Prompt | Sequence[Prompt], vocab_size: int) -> list[list[int]]:
    """One list of token ids per prompt: a str is UTF-8 bytes, bytes are themselves, a sequence of
    ints is taken as ids. A single prompt may be passed bare."""
    if isinstance(prompts, (str, bytes)) or (isinstance(prompts, Sequence) and prompts
                                               and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    check(isinstance(prompts, Sequence) and len(prompts) >= 1, "prompts",
          "must be a str, bytes, a list of token ids, or a non-empty list of those", type(prompts).__name__)
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = list(prompt.encode("utf-8"))
        elif isinstance(prompt, bytes):
            ids = list(prompt)
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            check(False, f"prompts[{i}]", "must be a str, bytes or a list of int token ids", type(prompt).__name__)
        check(len(ids) >= 1, f"prompts[{i}]", "is empty: a prompt needs at least one token (e.g. '\\n')", prompt)
        check(all(0 <= t < vocab_size for t in ids), f"prompts[{i}]",
              f"holds token ids outside [0, vocab_size={vocab_size})", [t for t in ids if not 0 <= t < vocab_size][:5])
        encoded.append(ids)
    return encoded


def _stop_id(stop: str | int | None, vocab_size: int) -> int | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        data = stop.encode("utf-8")
        check(len(data) == 1, "stop", "must be one byte (e.g. '\\n'), a token id, or None", stop)
        return data[0]
    check(isinstance(stop, int) and not isinstance(stop, bool) and 0 <= stop < vocab_size, "stop",
          f"must be a token id in [0, {vocab_size}), a one-byte str, or None", stop)
    return stop


def left_pad(prompt_tokens: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) token ids, prompts right-aligned, and the (B, P) bool mask of the real tokens."""
    P = max(len(p) for p in prompt_tokens)
    tokens_BP = torch.zeros(len(prompt_tokens), P, dtype=torch.long)
    real_BP = torch.zeros(len(prompt_tokens), P, dtype=torch.bool)
    for b, ids in enumerate(prompt_tokens):
        tokens_BP[b, P - len(ids):] = torch.tensor(ids)
        real_BP[b, P - len(ids):] = True
    return tokens_BP.to(device), real_BP.to(device)


def stream_generate(model: torch.nn.Module, prompts: Prompt | Sequence[Prompt], max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    stop: str | int | None = None, seed: int | None = None, window: int | None = None,
                    record_routing: bool = True, use_cache: bool = True) -> Iterator[GenerationStep]:
    """``generate`` one step at a time: yields a ``GenerationStep`` per generated token and returns
    (``StopIteration.value``) the ``GenerationResult``. See ``generate`` for the arguments."""
    cfg = model.cfg
    sampling = SamplingConfig(temperature, top_k, top_p)
    prompt_tokens = encode_prompts(prompts, cfg.vocab_size)
    stop_id = _stop_id(stop, cfg.vocab_size)
    check(isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1,
          "max_new_tokens", "must be an integer >= 1", max_new_tokens)
    check(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0), "seed",
          "must be an integer >= 0, or None for torch's global generator", seed)
    P = max(len(p) for p in prompt_tokens)
    if window is None:
        check(P + max_new_tokens <= cfg.seq_len, "max_new_tokens",
              f"the longest prompt ({P} tokens) plus {max_new_tokens} new tokens is {P + max_new_tokens}, more than "
              f"the model's context seq_len={cfg.seq_len}: ask for at most {max(cfg.seq_len - P, 0)}, or choose a "
              "sliding window", max_new_tokens)
    else:
        check(isinstance(window, int) and not isinstance(window, bool) and P <= window <= cfg.seq_len, "window",
              f"must be an integer between the longest prompt ({P} tokens) and the model's context "
              f"seq_len={cfg.seq_len}", window)
    check(use_cache or window is None, "window", "needs use_cache=True (the recompute baseline has no ring)", window)
    if (reason := decode_refusal(model)) is not None:
        raise DecodeRefused(reason)

    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    B = len(prompt_tokens)
    cache = KVCache(model, B, P + max_new_tokens if window is None else window, window=window,
                    max_positions=P + max_new_tokens)
    tokens_BP, real_BP = left_pad(prompt_tokens, device)
    prompt_real_BP = real_BP
    was_training = model.training
    model.eval()
    steps: list[list] = []  # per fed step: [(expert_ids_TK, gates_TK, scores_TE) per MoE layer]
    new_BN: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            out = model.forward_cached(tokens_BP, cache, None if bool(real_BP.all()) else real_BP)
        if record_routing:
            steps.append(_routing_of(out))
        logits_BV = out.logits[:, -1]
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        for index in range(max_new_tokens):
            with torch.inference_mode():
                next_B = sample(logits_BV, sampling, generator)
            was_done_B = done_B
            if stop_id is not None:
                done_B = done_B | (next_B == stop_id)
            new_BN.append(torch.where(was_done_B, -1, next_B))
            # one device-to-host copy per step (each is a sync on an accelerator): tokens and stops together
            tokens, finished = torch.stack([new_BN[-1], done_B.long()]).tolist()
            finished = [bool(f) for f in finished]
            yield GenerationStep(index, tokens, finished)
            last = index == max_new_tokens - 1 or all(finished)
            if record_routing or not last:
                with torch.inference_mode():
                    if use_cache:
                        out = model.forward_cached(next_B[:, None], cache)
                    else:  # the baseline: every token so far through a fresh cache
                        tokens_BP = torch.cat([tokens_BP, next_B[:, None]], dim=1)
                        real_BP = torch.cat([real_BP, real_BP.new_ones(B, 1)], dim=1)
                        cache = KVCache(model, B, tokens_BP.shape[1], max_positions=tokens_BP.shape[1])
                        out = model.forward_cached(tokens_BP, cache, None if bool(real_BP.all()) else real_BP)
                logits_BV = out.logits[:, -1]
                if record_routing:  # the new token's routing only (the recompute routes the whole prefix)
                    steps.append(_routing_of(out, last_only=not use_cache, batch=B))
            if last:
                break
    finally:
        model.train(was_training)

    new = torch.stack(new_BN, dim=1).cpu()
    new_tokens = [[t for t in row if t >= 0] for row in new.tolist()]
    stopped = [stop_id is not None and bool(ids) and ids[-1] == stop_id for ids in new_tokens]
    result = GenerationResult(prompt_tokens, new_tokens, stopped)
    if record_routing:
        result.routing = _aligned_routing(model, steps, prompt_real_BP.cpu(), [len(t) for t in result.tokens])
    return result


def generate(model: torch.nn.Module, prompts: Prompt | Sequence[Prompt], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop: str | int | None = None, seed: int | None = None, window: int | None = None,
             record_routing: bool = True, use_cache: bool = True) -> GenerationResult:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    prompts: a str (UTF-8 bytes), bytes or list of token ids, or a list of them (one batch).
    temperature: 0 is greedy (the default); above 0 samples, after ``top_k`` and ``top_p``
    (``workbench.inference.sampling``). stop: a byte ('\\n') or token id that ends a sequence.
    seed: fixes the samples (a ``torch.Generator``); None draws from torch's global generator.
    window: a sliding attention window of that many tokens (at most ``seq_len``), to generate
    past the context; without one, prompt + new tokens must fit in ``seq_len``.
    record_routing: the experts, gates and scores of every token in every MoE layer.
    use_cache: False recomputes the whole prefix at every step (a fresh cache, prefilled with all
    tokens so far): the baseline of ``workbench bench generate`` and of the determinism check.

    ``ValueError`` naming the argument for a bad value; ``DecodeRefused`` for a router that cannot
    decode token by token.
    """
    steps = stream_generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop=stop, seed=seed, window=window, record_routing=record_routing,
                            use_cache=use_cache)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _routing_of(out, *, last_only: bool = False, batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]]:
    """(experts, gates, scores) of each MoE layer; ``last_only``: of each sequence's last position."""
    fields = [(r.router_output.expert_ids_TK, r.router_output.weights_TK, r.router_output.scores_TE)
              for r in out.routing]
    if last_only:
        fields = [tuple(t.view(batch, -1, t.shape[-1])[:, -1] for t in layer) for layer in fields]
    return fields


def _aligned_routing(model: torch.nn.Module, steps: list[list], real_BP: torch.Tensor,
                     lengths: list[int]) -> list[LayerRouting]:
    """Per MoE layer, the recorded steps concatenated and each sequence shifted left past its
    padding, so that position j is the sequence's j-th token; beyond its length: expert -1, gate 0."""
    B, P = real_BP.shape
    blocks = [i for i, block in enumerate(model.blocks) if block.is_moe]
    pad_B = (~real_BP).sum(dim=1)
    N = max(lengths)
    index_BN = (torch.arange(N)[None, :] + pad_B[:, None])
    valid_BN = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    layers = []
    for layer, block in enumerate(blocks):
        grids = []
        for field_index in range(3):
            per_step = [step[layer][field_index].detach().float() if field_index else step[layer][field_index]
                        for step in steps]
            grid = torch.cat([t.reshape(B, -1, t.shape[-1]) for t in per_step], dim=1).cpu()
            index = index_BN.clamp(max=grid.shape[1] - 1)[:, :, None].expand(B, N, grid.shape[-1])
            grid = grid.gather(1, index)
            fill = -1 if field_index == 0 else 0.0
            grids.append(grid.masked_fill(~valid_BN[:, :, None], fill))
        layers.append(LayerRouting(block, *grids))
    return layers
