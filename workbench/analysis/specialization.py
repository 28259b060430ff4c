"""What do the experts learn? The OLMoE specialization analyses, each beside its random baseline.

Every analysis is a pure function of the streamed counts of ``workbench.analysis.traces``
(``RoutingCounts``), so it runs unchanged on a workbench model and on a Hugging Face model
traced through hooks (``workbench.interop.hf``). Each returns its ``score`` beside ``baseline``:
the value the same analysis gives for **random routing with the same per-expert load**, that is,
routing that sends every token to expert e at e's observed rate, whatever the token, its domain,
its other experts or its experts in the neighbouring layer. A score means something only by how
far it is above its baseline (``excess``): a balanced top-2 of 8 router already sends a quarter
of every domain's tokens to every expert.

==============================  ==================================  ===================================
analysis                        score                               baseline (same load, random)
==============================  ==================================  ===================================
``domain_specialization_nmi``   I(domain; expert) / min(H(domain),  Miller-Madow bias of the plug-in
                                H(expert)), over assignments        MI: (D-1)(E-1) / (2 N ln 2) bits
``vocabulary_specialization``   share of a token's occurrences      its expectation over random expert
                                routed to its most used expert      sets with rates q_e, simulated for
                                (OLMoE); per byte class too         n_v occurrences (-> max_e q_e; k/E
                                                                    when balanced)
``coactivation``                P(b | a) over all pairs of a        (k - 1) q_b / (k - q_a)
                                token's top-k set                   ((k-1)/(E-1) when balanced)
``router_saturation``           |S_t & S_final| / |S_final| over    sum_e q_e^t q_e^final / k
                                a fixed probe set                   (k/E when balanced)
``cross_layer_consistency``     NMI of (expert in l, expert in      Miller-Madow bias, as for domains
                                l + 1): first experts, or all pairs
==============================  ==================================  ===================================

``q_e`` is the load as a rate: assignments to expert e per routed token (they sum to k).

Shape legend: D domains, V vocabulary, E experts, K experts per token, P probe tokens, L MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.analysis.traces import RoutingCounts

# Tokens seen fewer times than this are left out of vocabulary specialization by default: OLMoE
# lists an expert's tokens only when the token occurred at least 10 times (run_moe_analysis.py).
DEFAULT_MIN_COUNT = 10


@dataclass
class Scored:
    """A score beside the score of random routing with the same per-expert load."""

    score: float
    baseline: float

    @property
    def excess(self) -> float:
        """How far the score is above random routing with the same load."""
        return self.score - self.baseline


# --- information helpers -------------------------------------------------------------------------


def _check_counts(name: str, counts: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.dim() != dim:
        got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"{name} must be a {dim}-D tensor of counts, got {got}")
    if counts.is_sparse:
        counts = counts.to_dense()
    if counts.numel() and float(counts.min()) < 0:
        raise ValueError(f"{name} holds negative counts (min {float(counts.min())}): counts are >= 0")
    return counts.double()


def _entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def mutual_information_bits(joint_AB: torch.Tensor) -> float:
    """Plug-in mutual information I(A; B) in bits of a table of joint counts."""
    p_AB = joint_AB / joint_AB.sum().clamp(min=1)
    outer_AB = p_AB.sum(dim=1, keepdim=True) * p_AB.sum(dim=0, keepdim=True)
    nz = p_AB > 0
    return float((p_AB[nz] * torch.log2(p_AB[nz] / outer_AB[nz])).sum())


def independence_bias_bits(joint_AB: torch.Tensor) -> float:
    """The expected plug-in MI (bits) of a table with these margins when A and B are independent,
    to first order: (r - 1)(c - 1) / (2 N ln 2), r and c the occupied rows and columns, N the
    total count (Miller 1955, "Note on the bias of information estimates"; Panzeri and Treves 1996).
    It counts every entry as an independent event; a token's k assignments are not quite
    independent (they are k distinct experts), which makes the true bias slightly smaller for k > 1.
    """
    n = float(joint_AB.sum())
    if n <= 0:
        return 0.0
    r = int((joint_AB.sum(dim=1) > 0).sum())
    c = int((joint_AB.sum(dim=0) > 0).sum())
    return (r - 1) * (c - 1) / (2 * n * math.log(2))


def _nmi(joint_AB: torch.Tensor) -> tuple[float, float, float, float]:
    """(NMI, its independence baseline, MI bits, baseline bits); NMI = I / min(H(A), H(B))."""
    n = joint_AB.sum().clamp(min=1)
    h = min(_entropy_bits(joint_AB.sum(dim=1) / n), _entropy_bits(joint_AB.sum(dim=0) / n))
    mi, bias = mutual_information_bits(joint_AB), independence_bias_bits(joint_AB)
    if h <= 0:  # one domain, or one expert used: nothing for the other to explain
        return float("nan"), float("nan"), mi, bias
    return mi / h, min(1.0, bias / h), mi, bias


# --- domain specialization -------------------------------------------------------------------------


@dataclass
class DomainSpecialization(Scored):
    """``score``: normalised mutual information between domain and expert; see
    ``domain_specialization_nmi``. The per-domain distributions are for heatmaps."""

    mi_bits: float = 0.0
    mi_baseline_bits: float = 0.0
    p_expert_given_domain_DE: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    load_E: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # P(e): every row's baseline
    kl_bits_D: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # KL(P(e | d) || P(e))
    share_DE: torch.Tensor | None = None  # OLMoE: N(d routed to e) / N(d tokens)
    share_baseline_E: torch.Tensor | None = None  # q_e: the share of a random routing with the same load


def domain_specialization_nmi(domain_expert_DE: torch.Tensor,
                              domain_tokens_D: torch.Tensor | None = None) -> DomainSpecialization:
    """How much the expert tells about the domain of the token, beside random routing.

        NMI = I(domain; expert) / min(H(domain), H(expert))

    over assignment events (a token routed to k experts counts k times), from ``domain_expert_DE``
    counts. 1 when each domain has experts of its own (the expert determines the domain), 0 when
    every domain uses the experts in the same proportions. Normalising by the smaller entropy
    keeps 1 reachable when E > D (the fine-grained case). It is ``sum_d p(d) KL(P(e|d) || P(e))``
    divided by that entropy; ``kl_bits_D`` gives each domain's term.

    Baseline: random routing with the same load has I = 0, but the plug-in estimate of I from N
    assignments is biased upward by about (D - 1)(E - 1) / (2 N ln 2) bits
    (``independence_bias_bits``); ``baseline`` is that bias, normalised the same way. Each row of
    ``p_expert_given_domain_DE`` has the load ``load_E`` as its baseline.

    With ``domain_tokens_D`` (tokens per domain), ``share_DE`` is OLMoE's domain specialization
    (Muennighoff et al. 2024, arXiv:2409.02060, section 5: the fraction of a domain's tokens
    routed to expert e, top-k counted), with baseline ``share_baseline_E`` = q_e (k/E when
    balanced, the random-chance level they compare with). Mutual information between domain and expert
    is the comparison Qiu et al. 2025 (arXiv:2501.11873) make between balancing scopes.
    """
    counts_DE = _check_counts("domain_expert_DE", domain_expert_DE, 2)
    nmi, baseline, mi, bias = _nmi(counts_DE)
    n_D, n_E = counts_DE.sum(dim=1), counts_DE.sum(dim=0)
    p_e_given_d = counts_DE / n_D.clamp(min=1).unsqueeze(1)
    load_E = n_E / n_E.sum().clamp(min=1)
    ratio = torch.where(p_e_given_d > 0, p_e_given_d / load_E.clamp(min=1e-300), torch.ones_like(p_e_given_d))
    kl_D = (p_e_given_d * torch.log2(ratio)).sum(dim=1)
    share_DE = share_baseline_E = None
    if domain_tokens_D is not None:
        tokens_D = _check_counts("domain_tokens_D", domain_tokens_D, 1)
        if tokens_D.numel() != counts_DE.shape[0]:
            raise ValueError(f"domain_tokens_D has {tokens_D.numel()} domains, domain_expert_DE "
                             f"{counts_DE.shape[0]}")
        share_DE = counts_DE / tokens_D.clamp(min=1).unsqueeze(1)
        share_baseline_E = n_E / tokens_D.sum().clamp(min=1)
    return DomainSpecialization(nmi, baseline, mi, bias, p_e_given_d, load_E, kl_D, share_DE, share_baseline_E)


# --- vocabulary specialization ---------------------------------------------------------------------


def _systematic_sample(q_E: torch.Tensor, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, J) expert ids and (num, J) bool real slots of ``random_expert_sets`` (J = ceil(sum q))."""
    E = q_E.numel()
    total = float(q_E.sum())
    points = max(1, math.ceil(total - 1e-9))
    perm_NE = torch.rand(num, E, generator=generator).argsort(dim=1)
    # float32 is plenty here: it moves an inclusion probability by about 1e-7
    cum_NE = q_E.float()[perm_NE].cumsum(dim=1)
    points_NJ = torch.rand(num, 1, generator=generator) + torch.arange(points, dtype=torch.float32)
    pos_NJ = torch.searchsorted(cum_NE, points_NJ, right=True).clamp(max=E - 1)
    return perm_NE.gather(1, pos_NJ), points_NJ < total


def random_expert_sets(q_E: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """(num, E) float64 multi-hot: ``num`` random expert sets, expert e in each with probability q_e.

    Randomised systematic sampling (Madow 1949): lay the experts' rates q_e (each at most 1) end to
    end in a random order and take the experts under the points u, u + 1, u + 2, ... below
    sum_e q_e, u ~ U(0, 1). Each set holds distinct experts, about sum_e q_e of them (exactly k for
    top-k counts), and e is included with probability exactly q_e; equal rates give a uniformly
    random k-subset."""
    ids_NJ, real_NJ = _systematic_sample(q_E, num, generator)
    return torch.zeros(num, q_E.numel(), dtype=torch.float64).scatter_add_(1, ids_NJ, real_NJ.double())


def _random_routing_max_share(n_v: torch.Tensor, q_E: torch.Tensor, draws: int, max_simulated: int,
                              generator: torch.Generator) -> torch.Tensor:
    """Expected max_e N(v, e) / N(v) under ``random_expert_sets`` routing, per token (see
    ``vocabulary_specialization``)."""
    q_E = q_E.clamp(max=1.0)
    E = q_E.numel()
    m_v = n_v.clamp(max=max_simulated).long()
    share_v = torch.empty(m_v.numel(), dtype=torch.float64)
    # token by token in chunks of about `budget` simulated occurrences: bounded memory for any vocabulary
    budget = max((1 << 23) // E, draws * max_simulated)
    cum = (m_v * draws).cumsum(0)
    start = 0
    while start < m_v.numel():
        done = int(cum[start - 1]) if start else 0
        end = max(start + 1, int(torch.searchsorted(cum, done + budget, right=True)))
        sizes = m_v[start:end].repeat_interleave(draws)  # group (v, r): m_v occurrences
        G = sizes.numel()
        ids_NJ, real_NJ = _systematic_sample(q_E, int(sizes.sum()), generator)
        group_NJ = torch.arange(G).repeat_interleave(sizes).unsqueeze(1).expand_as(ids_NJ)
        counts_GE = torch.bincount((group_NJ * E + ids_NJ)[real_NJ], minlength=G * E).view(G, E)
        share_v[start:end] = (counts_GE.max(dim=1).values.view(-1, draws) / m_v[start:end].unsqueeze(1)).mean(dim=1)
        start = end
    limit = float(q_E.max())
    return limit + (share_v - limit) * (m_v / n_v).sqrt()


@dataclass
class VocabularySpecialization(Scored):
    """``score``: occurrence-weighted mean of the per-token specialization; see
    ``vocabulary_specialization``."""

    score_per_id: float = 0.0  # unweighted mean over token ids (OLMoE's average)
    baseline_per_id: float = 0.0
    specialization_V: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # NaN: left out
    baseline_V: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    top_expert_V: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    load_rate_E: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # q_e per occurrence
    per_class: dict[str, Scored] = field(default_factory=dict)
    tokens_kept: int = 0  # token ids with at least min_count occurrences


def vocabulary_specialization(token_expert_VE: torch.Tensor, token_count_V: torch.Tensor, *,
                              classes: Mapping[str, Sequence[int]] | None = None,
                              min_count: int = DEFAULT_MIN_COUNT, draws: int = 16, max_simulated: int = 512,
                              seed: int = 0) -> VocabularySpecialization:
    """How consistently a token id goes to one expert (OLMoE's vocabulary specialization).

        spec(v) = max_e N(v, e) / N(v)

    N(v) is the number of occurrences of token id v and N(v, e) how many of them were routed to
    expert e (among their top-k: ``RoutingCounts.token_expert``; pass ``token_top1`` for the
    highest-gate expert only, as OLMoE's ``run_moe_analysis.py`` does). 1 when the token always
    goes to the same expert. Muennighoff et al. 2024 (arXiv:2409.02060, section 5) define it per
    (expert, token) pair and mark k/E as random chance; ``score`` weights tokens by their
    occurrences (each routed token counts once), ``score_per_id`` averages token ids (their
    average). Token ids with fewer than ``min_count`` occurrences are left out (NaN).

    Baseline: random routing with the same load. Every occurrence, whatever its token id, draws
    its set of experts so that expert e is included with its observed rate q_e = sum_v N(v, e) /
    sum_v N(v) (randomised systematic sampling, Madow 1949: k distinct experts, exact inclusion
    rates, and a uniformly random k-subset when the load is balanced). ``baseline_V`` is the
    expected spec(v) for N(v) such occurrences, the mean of ``draws`` simulations from a generator
    seeded with ``seed`` (reproducible). It is about max_e q_e for frequent tokens (k/E when
    balanced) and higher for rare ones, since the most used of E experts is then often used by
    chance. Tokens seen more than ``max_simulated`` times are simulated with that many occurrences
    and their excess over max_e q_e scaled by sqrt(max_simulated / N(v)) (the central limit rate;
    it overstates the baseline slightly where one expert's load stands out).

    ``classes`` maps a name to token ids (``workbench.analysis.traces.byte_classes()`` for the
    byte tokenizer): ``per_class[name]`` is the occurrence-weighted score and baseline over the
    class's kept tokens (NaN when none is kept).
    """
    counts_VE = _check_counts("token_expert_VE", token_expert_VE, 2)
    n_V = _check_counts("token_count_V", token_count_V, 1)
    V, E = counts_VE.shape
    if n_V.numel() != V:
        raise ValueError(f"token_count_V has {n_V.numel()} entries, token_expert_VE {V} rows")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count={min_count!r} is invalid: must be an integer >= 1")
    for name, value in (("draws", draws), ("max_simulated", max_simulated)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
    top_V, top_expert_V = counts_VE.max(dim=1)
    keep_V = n_V >= min_count
    nan = torch.full((V,), float("nan"), dtype=torch.float64)
    spec_V = torch.where(keep_V, top_V / n_V.clamp(min=1), nan)
    q_E = counts_VE.sum(dim=0) / n_V.sum().clamp(min=1)

    baseline_V = nan.clone()
    kept = keep_V.nonzero().flatten()
    if kept.numel():
        baseline_V[kept] = _random_routing_max_share(n_V[kept], q_E, draws, max_simulated,
                                                     torch.Generator().manual_seed(seed))

    def weighted(mask_V: torch.Tensor) -> Scored:
        m = mask_V & keep_V
        w = n_V[m]
        if w.sum() <= 0:
            return Scored(float("nan"), float("nan"))
        return Scored(float((spec_V[m] * w).sum() / w.sum()), float((baseline_V[m] * w).sum() / w.sum()))

    overall = weighted(torch.ones(V, dtype=torch.bool))
    per_id = (float(spec_V[keep_V].mean()), float(baseline_V[keep_V].mean())) if keep_V.any() else (
        float("nan"), float("nan"))
    per_class: dict[str, Scored] = {}
    for name, ids in (classes or {}).items():
        member_V = torch.zeros(V, dtype=torch.bool)
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        if ids_t.numel() and (int(ids_t.min()) < 0 or int(ids_t.max()) >= V):
            raise ValueError(f"classes[{name!r}] holds token ids outside [0, {V})")
        member_V[ids_t] = True
        per_class[name] = weighted(member_V)
    return VocabularySpecialization(overall.score, overall.baseline, per_id[0], per_id[1], spec_V, baseline_V,
                                    top_expert_V, q_E, per_class, int(keep_V.sum()))


# --- co-activation ---------------------------------------------------------------------------------


@dataclass
class Coactivation(Scored):
    """``score``: mean over experts a of max_b P(b | a); see ``coactivation``."""

    p_b_given_a_EE: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # NaN on the diagonal
    baseline_EE: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))


def coactivation(coactivation_EE: torch.Tensor, tokens: int) -> Coactivation:
    """How often expert b is active when expert a is, over all pairs of each token's top-k set.

        P(b | a) = N(a and b both among the token's experts) / N(a among the token's experts)

    from ``RoutingCounts.coactivation_LEE[l]`` (its diagonal is N(a), the load) and the number of
    routed ``tokens``. OLMoE (Muennighoff et al. 2024, arXiv:2409.02060, section 5)
    plots the same conditional, but its script (``run_moe_analysis.py``, ``do_correlation_analysis``)
    counts only *adjacent* pairs of the top-k list sorted by router logit (1st-2nd, 2nd-3rd, ...,
    k-1 pairs per token, both orders), so its P(b | a) is roughly (k - 1) / (k(k - 1)/2) = 2 / k
    times this one for k > 2 and weights experts of neighbouring rank. Here every unordered pair of
    the set counts (k(k-1)/2 per token), so the conditional does not depend on the gate order, and
    a row sums to k - 1 (the other experts of a's tokens). Equal for k = 2.

    ``score`` is the mean over used experts a of max_{b != a} P(b | a) (how strongly each expert
    has a preferred partner). Baseline: with the same load, a's k - 1 partners are drawn in
    proportion to the other experts' loads, P0(b | a) = (k - 1) q_b / (k - q_a), with q_e = N(e) /
    tokens and k = sum_e q_e; (k - 1) / (E - 1) when balanced (exact for uniform random k-subsets,
    the proportional draw otherwise). Like any maximum of estimates, the score of random routing
    exceeds this limit by sampling noise when few tokens are counted.
    """
    c_EE = _check_counts("coactivation_EE", coactivation_EE, 2)
    if c_EE.shape[0] != c_EE.shape[1]:
        raise ValueError(f"coactivation_EE must be square (E, E), got {tuple(c_EE.shape)}")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens={tokens!r} is invalid: the number of routed tokens, an integer >= 1")
    E = c_EE.shape[0]
    load_E = c_EE.diagonal().clone()
    q_E = load_E / tokens
    k = float(q_E.sum())
    p_EE = c_EE / load_E.clamp(min=1).unsqueeze(1)
    base_EE = (k - 1) * q_E.unsqueeze(0) / (k - q_E).clamp(min=1e-12).unsqueeze(1)
    eye = torch.eye(E, dtype=torch.bool)
    p_EE = p_EE.masked_fill(eye, float("nan"))
    base_EE = base_EE.masked_fill(eye, float("nan"))
    used = load_E > 0
    if E < 2 or not used.any():
        return Coactivation(float("nan"), float("nan"), p_EE, base_EE)
    off = ~eye
    best = p_EE.masked_fill(~off, -1.0).max(dim=1).values
    best0 = base_EE.masked_fill(~off, -1.0).max(dim=1).values
    return Coactivation(float(best[used].mean()), float(best0[used].mean()), p_EE, base_EE)


# --- router saturation -----------------------------------------------------------------------------


@dataclass
class Saturation(Scored):
    """``score``: top-k overlap with the final checkpoint; see ``router_saturation``."""

    top1: float = 0.0  # share of probe tokens whose highest-gate expert is the final one's
    top1_baseline: float = 0.0


def _probe_rates(ranked_PK: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,) inclusion rate among the probe tokens' sets and (E,) top-1 rate."""
    P = ranked_PK.shape[0]
    real = ranked_PK >= 0
    inc_E = torch.zeros(E, dtype=torch.float64).index_add_(0, ranked_PK[real], torch.ones(int(real.sum()),
                                                                                           dtype=torch.float64))
    first = ranked_PK[:, 0][ranked_PK[:, 0] >= 0]
    top1_E = torch.bincount(first, minlength=E).double()
    return inc_E / max(P, 1), top1_E / max(P, 1)


def router_saturation(ranked_PK: torch.Tensor, final_PK: torch.Tensor, num_experts: int) -> Saturation:
    """How much of the final routing a checkpoint already has (OLMoE's router saturation).

        saturation(t) = mean over probe tokens of |S_t(x) & S_final(x)| / |S_final(x)|

    S(x) is the set of a probe token's experts in one MoE layer (``ranked_PK``: (P, K) expert ids,
    highest gate first, -1 for an empty slot, as ``RoutingCounts.probe_topk_LPK[l]`` or
    ``traces.probe_routing`` give them) at checkpoint t and at the final checkpoint, for the same
    fixed probe tokens. ``top1`` is the share whose highest-gate expert is the same, OLMoE's top-1
    variant. Muennighoff et al. 2024 (arXiv:2409.02060, section 5;
    ``run_moe_analysis.py``, ``do_ckpt_analysis``, which divides by k) report it per layer over
    pretraining; a router "saturates" when it is near 1 early.

    Baseline: each checkpoint routes randomly with its own probe load, independently of the token:
    E|S_t & S_final| = sum_e q_e^t q_e^final, q_e the share of probe tokens with e in their set, so
    the baseline is sum_e q_e^t q_e^final / k (k/E when both are balanced); for top-1,
    sum_e p_e^t p_e^final with p the top-1 shares (1/E when balanced).
    """
    if not isinstance(ranked_PK, torch.Tensor) or not isinstance(final_PK, torch.Tensor) or ranked_PK.dim() != 2:
        raise ValueError("ranked_PK and final_PK must be (P, K) tensors of expert ids")
    if ranked_PK.shape[0] != final_PK.shape[0]:
        raise ValueError(f"ranked_PK has {ranked_PK.shape[0]} probe tokens, final_PK {final_PK.shape[0]}: "
                         "route the same probe set at both checkpoints")
    E = num_experts
    t_PK, f_PK = ranked_PK.long(), final_PK.long()
    if max(int(t_PK.max()), int(f_PK.max())) >= E:
        raise ValueError(f"num_experts={E!r} is invalid: the probes hold expert ids up to "
                         f"{max(int(t_PK.max()), int(f_PK.max()))}")
    P = t_PK.shape[0]
    hot_t = torch.zeros(P, E + 1, dtype=torch.float64).scatter_(1, t_PK.clamp(min=-1) % (E + 1), 1.0)[:, :E]
    hot_f = torch.zeros(P, E + 1, dtype=torch.float64).scatter_(1, f_PK.clamp(min=-1) % (E + 1), 1.0)[:, :E]
    size_f = hot_f.sum(dim=1)
    has = size_f > 0
    overlap = float(((hot_t * hot_f).sum(dim=1)[has] / size_f[has]).mean()) if has.any() else float("nan")
    inc_t, top1_t = _probe_rates(t_PK, E)
    inc_f, top1_f = _probe_rates(f_PK, E)
    k = float(size_f[has].mean()) if has.any() else float("nan")
    baseline = float((inc_t * inc_f).sum()) / k if has.any() else float("nan")
    valid = (t_PK[:, 0] >= 0) & (f_PK[:, 0] >= 0)
    top1 = float((t_PK[valid, 0] == f_PK[valid, 0]).double().mean()) if valid.any() else float("nan")
    return Saturation(overlap, baseline, top1, float((top1_t * top1_f).sum()))


def saturation_curve(probes: Sequence[tuple[int, torch.Tensor]], layers: Sequence[int],
                     num_experts: int) -> list[dict[str, Any]]:
    """Router saturation of every recorded checkpoint against the last one, per MoE layer.

    ``probes``: (step, (L, P, K) ranked experts) in training order (``ProbeRecorder.probes``);
    ``layers``: the model layer of each of the L. Rows: step, layer, saturation, baseline, top1,
    top1_baseline (tidy, for pandas and plotting)."""
    if not probes:
        raise ValueError("probes is empty: record the probe routing at two checkpoints or more")
    final = probes[-1][1]
    rows = []
    for step, ranked in probes:
        for li, layer in enumerate(layers):
            s = router_saturation(ranked[li], final[li], num_experts)
            rows.append({"step": step, "layer": layer, "saturation": s.score, "baseline": s.baseline,
                         "top1": s.top1, "top1_baseline": s.top1_baseline})
    return rows


# --- cross-layer consistency -----------------------------------------------------------------------


@dataclass
class CrossLayer(Scored):
    """``score``: NMI of consecutive layers' experts; see ``cross_layer_consistency``."""

    mi_bits: float = 0.0
    mi_baseline_bits: float = 0.0
    p_next_given_prev_EE: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    load_next_E: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # every row's baseline


def cross_layer_consistency(transition_EE: torch.Tensor) -> CrossLayer:
    """How well a token's experts in MoE layer l predict its experts in layer l + 1.

        NMI = I(a; b) / min(H(a), H(b))

    over (a, b) pairs of each token, a an expert of the token in layer l and b one in layer l + 1.
    Two countings, both from ``RoutingCounts``: ``transition_top1_LEE[l]`` pairs each token's
    highest-gate experts (one pair per token), and ``specialization_table`` reports it as
    ``cross_layer``: 0 when the layers choose independently, 1 when the first expert of layer l
    fixes that of layer l + 1 (a path through the layers). ``transition_LEE[l]`` pairs every expert
    of the two sets (k_l * k_{l+1} pairs per token; ``cross_layer_pairs``): it uses all of the
    routing, but with k > 1 even a fixed map from a token's set in layer l to its set in layer
    l + 1 scores well below 1 (about 0.2 for top-2 of 8), since each a is paired with every
    expert of the next set, so compare it only between models with the same k and E.
    OLMoE's cross-layer counts (``run_routing_analysis.py``, plotted in
    ``plot_routing_analysis_v2_cross_layer.ipynb``) differ in two ways: they pair layers 0-7 and
    7-15 rather than consecutive MoE layers, and they pair experts of equal rank (the r-th expert
    by router logit in one layer with the r-th in the other, k pairs per token), where this counts
    every pair of the two sets, so it does not depend on the gate order within a token's top-k.
    ``p_next_given_prev_EE`` is the conditional P(b | a) of those pairs, with the next layer's load
    ``load_next_E`` as every row's baseline.

    Baseline: independent layers with the same loads give I = 0; the plug-in estimate is biased
    upward by about (E-1)^2 / (2 N ln 2) bits (``independence_bias_bits``), normalised the same way.
    """
    t_EE = _check_counts("transition_EE", transition_EE, 2)
    nmi, baseline, mi, bias = _nmi(t_EE)
    p = t_EE / t_EE.sum(dim=1, keepdim=True).clamp(min=1)
    load_next = t_EE.sum(dim=0) / t_EE.sum().clamp(min=1)
    return CrossLayer(nmi, baseline, mi, bias, p, load_next)


# --- every analysis of every layer -----------------------------------------------------------------


def specialization_table(counts: RoutingCounts, *, classes: Mapping[str, Sequence[int]] | None = None,
                         min_count: int = DEFAULT_MIN_COUNT, draws: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """One row per MoE layer with every score beside its baseline (tidy, for pandas).

    Keys: layer; domain_nmi, domain_nmi_baseline; vocab, vocab_baseline (top-k counts); vocab_top1,
    vocab_top1_baseline; vocab/<class>, vocab/<class>_baseline; coactivation, coactivation_baseline;
    cross_layer (first experts) and cross_layer_pairs (all pairs), each with _baseline, to the next
    MoE layer (NaN for the last). ``min_count``, ``draws`` and ``seed`` go to
    ``vocabulary_specialization`` (fewer draws: a faster, noisier vocabulary baseline)."""
    rows = []
    for li, layer in enumerate(counts.layers):
        dom = domain_specialization_nmi(counts.domain_expert_LDE[li], counts.domain_tokens_D)
        voc = vocabulary_specialization(counts.token_expert[li], counts.token_count_V, classes=classes,
                                        min_count=min_count, draws=draws, seed=seed)
        top1 = vocabulary_specialization(counts.token_top1[li], counts.token_count_V, min_count=min_count,
                                         draws=draws, seed=seed)
        co = coactivation(counts.coactivation_LEE[li], max(counts.tokens, 1))
        row: dict[str, Any] = {"layer": layer, "domain_nmi": dom.score, "domain_nmi_baseline": dom.baseline,
                               "vocab": voc.score, "vocab_baseline": voc.baseline, "vocab_top1": top1.score,
                               "vocab_top1_baseline": top1.baseline}
        for name, s in voc.per_class.items():
            row[f"vocab/{name}"], row[f"vocab/{name}_baseline"] = s.score, s.baseline
        row.update(coactivation=co.score, coactivation_baseline=co.baseline)
        nan = float("nan")
        if li + 1 < len(counts.layers):
            top1_path = cross_layer_consistency(counts.transition_top1_LEE[li])
            pairs = cross_layer_consistency(counts.transition_LEE[li])
            row.update(cross_layer=top1_path.score, cross_layer_baseline=top1_path.baseline,
                       cross_layer_pairs=pairs.score, cross_layer_pairs_baseline=pairs.baseline)
        else:
            row.update(cross_layer=nan, cross_layer_baseline=nan, cross_layer_pairs=nan, cross_layer_pairs_baseline=nan)
        rows.append(row)
    return rows
