"""Expert-parallel load balancing for serving: place experts, with redundant replicas, on devices so
that the most-loaded device carries as little as possible.

Under expert parallelism each device holds some experts of a layer and computes every token routed
to them, so a decode step waits for the device with the most work: the slowest device sets the
step time. DeepSeek's EPLB (Expert Parallelism Load Balancer, github.com/deepseek-ai/EPLB; the
redundant experts of the DeepSeek-V3 report, arXiv:2412.19437, section 3.4) balances it in two
moves, which ``place`` follows (its global policy, without the node-level grouping):

1. **replicate**: with ``redundant`` extra expert slots, give each one to the expert with the
   highest load per replica so far (a replicated expert's tokens are split evenly between its
   replicas);
2. **pack**: the replicas, heaviest first, each onto the least-loaded device that still has a
   free slot (every device holds the same number of slots, ceil((E + R) / G)) and, where possible,
   no replica of the same expert: the longest-processing-time rule (Graham 1969, "Bounds on
   multiprocessing timing anomalies", within 4/3 of the optimum).

``place`` then swaps replicas between the most-loaded device and the others while that lowers the
maximum, and keeps plain ``round_robin`` (expert e on device e mod G, no replicas) if that is
still better, so it is never worse than the baseline by construction (the tests check it).

``step_time_factor`` feeds the imbalance into a decode model: the expert part of a step runs at
the most-loaded device's pace, max / mean times the balanced one; the rest of the step is not
affected. ``imbalance`` is max / mean of the device loads (1 is perfect).

Shape legend: E experts, R redundant replicas, G devices, L MoE layers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workbench.validation import check, check_int


@dataclass(frozen=True)
class Placement:
    """Where every replica lives and what each device carries.

    ``replica_expert``, ``replica_device``, ``replica_load``: one entry per replica (an expert with
    r replicas appears r times, each with 1/r of its load). ``device_loads``: (G,) the load each
    device computes. ``method``: "eplb", "round-robin", or "round-robin (kept: better than eplb)".
    """

    replica_expert: tuple[int, ...]
    replica_device: tuple[int, ...]
    replica_load: tuple[float, ...]
    device_loads: tuple[float, ...]
    method: str

    @property
    def max_load(self) -> float:
        return max(self.device_loads)

    @property
    def mean_load(self) -> float:
        return sum(self.device_loads) / len(self.device_loads)

    @property
    def imbalance(self) -> float:
        """max / mean of the device loads (1: perfectly balanced)."""
        return imbalance(self.device_loads)

    def experts_on(self, device: int) -> list[int]:
        return [e for e, d in zip(self.replica_expert, self.replica_device, strict=True) if d == device]


def imbalance(device_loads: Sequence[float]) -> float:
    """max / mean of ``device_loads``; 1 when they are all equal (or all zero)."""
    loads = np.asarray(device_loads, dtype=float)
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0


def _check(loads: Sequence[float], devices: int) -> np.ndarray:
    loads = np.asarray(loads, dtype=float)
    check(loads.ndim == 1 and loads.size >= 1, "loads", "must be a non-empty (E,) array of per-expert loads",
          loads.shape)
    check(bool((loads >= 0).all()), "loads", "must be >= 0", loads.min())
    check_int("devices", devices, 1)
    return loads


def round_robin(loads: Sequence[float], devices: int) -> Placement:
    """The baseline: expert e on device e mod G, no replicas."""
    loads = _check(loads, devices)
    where = [e % devices for e in range(loads.size)]
    dev = np.zeros(devices)
    np.add.at(dev, where, loads)
    return Placement(tuple(range(loads.size)), tuple(where), tuple(loads.tolist()), tuple(dev.tolist()),
                     "round-robin")


def replicate(loads: Sequence[float], redundant: int) -> np.ndarray:
    """(E,) replicas per expert (>= 1, summing to E + ``redundant``): each extra replica goes to the
    expert with the highest load per replica so far (EPLB's ``replicate_experts``)."""
    loads = np.asarray(loads, dtype=float)
    check_int("redundant", redundant, 0)
    counts = np.ones(loads.size, dtype=int)
    for _ in range(redundant):
        counts[int(np.argmax(loads / counts))] += 1
    return counts


def place(loads: Sequence[float], devices: int, redundant: int = 0, *, swaps: int = 1000) -> Placement:
    """EPLB's placement of E experts with ``redundant`` extra replicas on ``devices`` devices (see
    the module docstring): replicate, pack heaviest first onto the least-loaded device with a free
    slot, improve by swaps (at most ``swaps``), keep round-robin if it is better."""
    loads = _check(loads, devices)
    check_int("redundant", redundant, 0)
    counts = replicate(loads, redundant)
    experts = np.repeat(np.arange(loads.size), counts)
    per_replica = (loads / counts)[experts]
    slots = math.ceil(experts.size / devices)
    dev_load = np.zeros(devices)
    dev_count = np.zeros(devices, dtype=int)
    holds = [set() for _ in range(devices)]
    where = np.empty(experts.size, dtype=int)
    # heaviest first; ties by expert id so the placement is deterministic
    for i in sorted(range(experts.size), key=lambda i: (-per_replica[i], experts[i])):
        free = [d for d in range(devices) if dev_count[d] < slots]
        apart = [d for d in free if experts[i] not in holds[d]] or free
        d = min(apart, key=lambda d: (dev_load[d], d))
        where[i] = d
        dev_load[d] += per_replica[i]
        dev_count[d] += 1
        holds[d].add(int(experts[i]))
    _improve_by_swaps(where, per_replica, experts, dev_load, swaps)
    eplb = Placement(tuple(experts.tolist()), tuple(where.tolist()), tuple(per_replica.tolist()),
                     tuple(dev_load.tolist()), "eplb")
    baseline = round_robin(loads, devices)
    if baseline.max_load < eplb.max_load - 1e-12:
        return Placement(baseline.replica_expert, baseline.replica_device, baseline.replica_load,
                         baseline.device_loads, "round-robin (kept: better than eplb)")
    return eplb


def _improve_by_swaps(where: np.ndarray, load: np.ndarray, experts: np.ndarray, dev_load: np.ndarray,
                      budget: int) -> None:
    """Swap a replica of the most-loaded device with a lighter one elsewhere while that lowers the
    larger of the two devices' loads below the maximum (slot counts stay equal); in place."""
    # replicas of each expert per device (an expert with more replicas than devices shares one)
    holds = [Counter(experts[where == d].tolist()) for d in range(dev_load.size)]
    for _ in range(budget):
        top = int(np.argmax(dev_load))
        best = None
        for i in np.flatnonzero(where == top):
            lighter = np.flatnonzero((where != top) & (load < load[i]))
            delta = load[i] - load[lighter]
            others = where[lighter]
            new_max = np.maximum(dev_load[top] - delta, dev_load[others] + delta)
            for n in np.argsort(new_max, kind="stable"):
                if new_max[n] >= dev_load[top] - 1e-12 or (best is not None and new_max[n] >= best[0]):
                    break
                j, other = int(lighter[n]), int(others[n])
                if holds[other][int(experts[i])] > 0 or holds[top][int(experts[j])] > 0:
                    continue  # keep replicas of one expert apart
                best = (float(new_max[n]), int(i), j, other, float(delta[n]))
                break
        if best is None:
            return
        _, i, j, other, delta = best
        where[i], where[j] = other, top
        holds[top][int(experts[i])] -= 1
        holds[top][int(experts[j])] += 1
        holds[other][int(experts[j])] -= 1
        holds[other][int(experts[i])] += 1
        dev_load[top] -= delta
        dev_load[other] += delta


def step_time_factor(imbalance_ratio: float, expert_fraction: float) -> float:
    """How much longer a decode step takes when the expert part runs at the most-loaded device's
    pace: (1 - f) + f x max/mean, f the share of the balanced step spent in the experts."""
    check(imbalance_ratio >= 1 - 1e-9, "imbalance_ratio", "must be >= 1 (max / mean)", imbalance_ratio)
    check(0 <= expert_fraction <= 1, "expert_fraction", "must be in [0, 1]", expert_fraction)
    return (1 - expert_fraction) + expert_fraction * imbalance_ratio


def layers_imbalance(placements: Sequence[Placement]) -> float:
    """The imbalance of a whole step over MoE layers that run one after another: the sum of each
    layer's most-loaded device over the sum of the means (a layer's slowest device waits for the
    next layer's dispatch, so per-layer maxima add up)."""
    check(len(placements) >= 1, "placements", "must hold one placement per MoE layer", len(placements))
    mean = sum(p.mean_load for p in placements)
    return sum(p.max_load for p in placements) / mean if mean > 0 else 1.0


def balance_table(loads_LE: np.ndarray, devices: Sequence[int], redundant: Sequence[int]) -> list[dict]:
    """One row per (G, R): the round-robin and EPLB imbalance over the layers of ``loads_LE`` (L, E)."""
    loads_LE = np.atleast_2d(np.asarray(loads_LE, dtype=float))
    rows = []
    for G in devices:
        before = [round_robin(row, G) for row in loads_LE]
        for R in redundant:
            after = [place(row, G, R) for row in loads_LE]
            rows.append({"devices": G, "redundant": R, "experts": loads_LE.shape[1],
                         "before": layers_imbalance(before), "after": layers_imbalance(after),
                         "kept_round_robin": sum(p.method != "eplb" for p in after)})
    return rows
