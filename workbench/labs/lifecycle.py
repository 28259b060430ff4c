"""The lifecycle lab (``notebooks/08_upcycling_and_finetuning.ipynb``): sparse upcycling and
fine-tuning on a domain shift, what it trains, measures and judges.

Everything pretrains on three domains of the built-in corpus (``PRETRAIN_DOMAINS``); the fourth
(``NEW_DOMAIN``) is held out for part 2. Validation always covers all four.

**Part 1, upcycling at equal compute** (``upcycling_specs``), per seed:

- ``dense``: a dense model (the MoE's shape with one FFN of the experts' width) trained
  ``dense_steps``; its training FLOPs are counted in every arm that starts from it;
- ``upcycled copy`` / ``upcycled drop`` / ``upcycled granular``: the dense checkpoint turned into
  an MoE (``workbench.upcycle``: every expert a copy of the FFN (Komatsuzaki et al. 2022,
  arXiv:2212.05055); Drop-Upcycling's copies with half of each expert's hidden units
  re-initialised (Nakamura et al. 2025, arXiv:2502.19261); or the FFN cut into finer experts,
  granular upcycling), then trained ``upcycle_steps`` with a new optimizer and schedule;
- ``MoE from scratch``: the same MoE trained from a random initialisation for the same total
  FLOPs as ``upcycled copy`` *including* the dense pretraining (OLMoE's comparison, Muennighoff
  et al. 2024, arXiv:2409.02060, section 4.1);
- ``dense continued``: the dense checkpoint trained on for the same total FLOPs.

FLOPs are exact: ``ModelConfig.flops_per_token`` x the tokens of every optimizer step
(``plan_budget``), so a step of the cheaper dense model buys less compute than an MoE step.

**Part 2, fine-tuning on the new domain** (``finetune_specs``): ``MoE from scratch`` (the tiny
preset after its run of part 1) and its dense twin (``dense_baseline``: the MoE's active
parameters, trained for the same FLOPs on the same domains) are fine-tuned ``finetune_steps`` on
``NEW_DOMAIN`` alone, each MoE method training a different part (``FINETUNES``). Per-domain
validation loss before and after gives the gain on the new domain and the forgetting of the old
ones; the domain x expert routing before and after shows how the new domain's routing moves.

**How it judges** (thresholds fixed here before any run; every comparison paired over seeds: a
seed fixes the initialisation and the batches of every arm, so per-seed differences cancel most
of the noise; SE = std of the per-seed differences / sqrt(seeds)):

- *upcycling beats scratch* and *upcycling beats continued dense*: the final in-domain
  validation loss (mean over ``PRETRAIN_DOMAINS``) of ``upcycled copy`` is lower than the other
  arm's by more than ``NOISE_SE`` paired SE; the *crossover*, where the from-scratch curve
  reaches the upcycled one within the budget, is reported per seed (``crossover``);
- *Drop-Upcycling diversifies experts and trains better*: at the end, the mean pairwise cosine
  similarity of the experts' weights and that of their routing are lower than plain copies' by
  more than ``NOISE_SE`` paired SE, and so is the final loss;
- *granular beats coarse upcycling*: the final loss of ``upcycled granular`` is lower than
  ``upcycled copy``'s by more than ``NOISE_SE`` paired SE;
- *ST-MoE*: fine-tuning the non-MoE parameters only gains on the new domain no less than full
  fine-tuning, within seed noise (short of it by at most ``NOISE_SE`` paired SE);
- *ESFT*: fine-tuning the experts the new domain routes to most (ESFT's top-p rule at
  ``ESFT_TOP_P``) gains no less than full fine-tuning within seed noise and forgets less by more
  than ``NOISE_SE`` paired SE.

With one seed nothing is judged (no seed noise to judge by); the verdicts say so.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from workbench.config import ModelConfig, dense_baseline
from workbench.labs.balancing import NOISE_SE
from workbench.labs.generation import load_results as _load_results
from workbench.labs.generation import save_results as _save_results
from workbench.train.config import TrainConfig
from workbench.validation import check

STEM = "08_upcycling_and_finetuning"
PRETRAIN_DOMAINS = ("code", "prose", "math")
NEW_DOMAIN = "records"

# --- the arms ------------------------------------------------------------------------------------

DENSE, SCRATCH, CONTINUED, TWIN = "dense", "MoE from scratch", "dense continued", "dense twin"
COPY, DROP, GRANULAR = "upcycled copy", "upcycled drop", "upcycled granular"
UPCYCLED = (COPY, DROP, GRANULAR)
PART1 = (DENSE, COPY, DROP, GRANULAR, SCRATCH, CONTINUED)

# How each upcycled arm is made (``workbench.upcycle.upcycle``'s keywords, fixed before any run):
# Drop-Upcycling's ratio 0.5 is the paper's best; the routers start at small random values.
UPCYCLE_METHODS: dict[str, dict[str, Any]] = {
    COPY: {"method": "copy", "router_init": "small"},
    DROP: {"method": "drop", "drop_ratio": 0.5, "router_init": "small"},
    GRANULAR: {"method": "granular", "router_init": "small"},
}
GRANULARITY = 2  # granular upcycling: each expert of the coarse MoE becomes 2 experts of half its width

# Fine-tuning methods on the MoE (name -> TrainConfig fields), and the dense twin's.
ESFT_TOP_P = 0.3  # ESFT: each layer's fewest experts holding >= 30% of the new domain's routing
FINETUNES: dict[str, dict[str, Any]] = {
    "full": {"trainable": "all"},
    "frozen routers": {"trainable": "non_router"},
    "non-MoE only (ST-MoE)": {"trainable": "non_moe"},
    "experts only": {"trainable": "experts"},
    "ESFT": {"trainable": "esft", "esft_domain": NEW_DOMAIN, "esft_top_p": ESFT_TOP_P},
}
TWIN_FINETUNE = "dense twin, full"
FINETUNE_LR = 1e-3  # fine-tuning: a third of the pretraining peak, a short warmup
FINETUNE_WARMUP = 10


# --- the configs and the FLOP budget ----------------------------------------------------------------


def lab_configs(moe_cfg: ModelConfig, *, granularity: int = GRANULARITY) -> dict[str, ModelConfig]:
    """The model of every arm from the MoE ``moe_cfg`` (the tiny preset in the notebook):

    - ``dense``: the same model with one FFN of the experts' width (``expert_hidden``), the model
      that copy upcycling turns into ``moe_cfg``;
    - ``coarse``: ``moe_cfg`` itself (copy and drop upcycling, from scratch);
    - ``granular``: ``granularity`` x the experts, each ``granularity`` x narrower, at
      ``granularity`` x the top-k: the same total and active expert parameters;
    - ``twin``: ``dense_baseline(moe_cfg)``, the dense model with the MoE's active parameters."""
    moe = moe_cfg.moe
    check(moe is not None, "moe_cfg", "must be an MoE model (its moe config is None)", moe)
    check(isinstance(granularity, int) and granularity >= 1 and moe.expert_hidden % granularity == 0,
          "granularity", f"must be an integer >= 1 that divides expert_hidden={moe.expert_hidden}", granularity)
    granular = replace(moe, num_experts=moe.num_experts * granularity, top_k=moe.top_k * granularity,
                       expert_hidden=moe.expert_hidden // granularity)
    return {"dense": moe_cfg.replace(moe=None, dense_hidden=moe.expert_hidden), "coarse": moe_cfg,
            "granular": moe_cfg.replace(moe=granular), "twin": dense_baseline(moe_cfg)}


@dataclass(frozen=True)
class Budget:
    """Steps and exact training FLOPs of every arm of part 1, and of part 2's dense twin.

    ``tokens_per_step`` = batch_size x grad_accum x seq_len (the trainer's count). ``flops[arm]``
    is the arm's *total*, the dense pretraining included for the arms that start from it."""

    tokens_per_step: int
    flops_per_token: dict[str, int]  # per model: dense, coarse, granular, twin
    steps: dict[str, int]  # per arm
    flops: dict[str, int]  # per arm, total (parents included)
    offset: dict[str, int]  # per arm: FLOPs spent before its first step (its parent's total)


def plan_budget(configs: dict[str, ModelConfig], *, dense_steps: int, upcycle_steps: int,
                tokens_per_step: int) -> Budget:
    """The budget of part 1 (module docstring): ``dense`` trains ``dense_steps``; each upcycled arm
    ``upcycle_steps`` on top; ``MoE from scratch`` and ``dense continued`` the steps that come
    closest to ``upcycled copy``'s total FLOPs; the dense twin (part 2) as many FLOPs as ``MoE from
    scratch``. Steps are whole, so equal compute holds to within one step (``flops`` is exact)."""
    check(dense_steps >= 1 and upcycle_steps >= 1 and tokens_per_step >= 1, "steps",
          "dense_steps, upcycle_steps and tokens_per_step must be >= 1", (dense_steps, upcycle_steps, tokens_per_step))
    fpt = {name: cfg.flops_per_token() for name, cfg in configs.items()}
    step_flops = {name: f * tokens_per_step for name, f in fpt.items()}
    dense = dense_steps * step_flops["dense"]
    budget = dense + upcycle_steps * step_flops["coarse"]
    scratch_steps = max(1, round(budget / step_flops["coarse"]))
    continued_steps = max(1, round((budget - dense) / step_flops["dense"]))
    twin_steps = max(1, round(scratch_steps * step_flops["coarse"] / step_flops["twin"]))
    steps = {DENSE: dense_steps, COPY: upcycle_steps, DROP: upcycle_steps, GRANULAR: upcycle_steps,
             SCRATCH: scratch_steps, CONTINUED: continued_steps, TWIN: twin_steps}
    model = {DENSE: "dense", COPY: "coarse", DROP: "coarse", GRANULAR: "granular", SCRATCH: "coarse",
             CONTINUED: "dense", TWIN: "twin"}
    offset = {arm: (dense if arm in (*UPCYCLED, CONTINUED) else 0) for arm in steps}
    flops = {arm: offset[arm] + steps[arm] * step_flops[model[arm]] for arm in steps}
    return Budget(tokens_per_step, fpt, steps, flops, offset)


ARM_MODEL = {DENSE: "dense", COPY: "coarse", DROP: "coarse", GRANULAR: "granular", SCRATCH: "coarse",
             CONTINUED: "dense", TWIN: "twin"}


# --- the runs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of the lab: ``name`` at ``seed``, trained from ``parent``'s final weights (or from
    scratch), through ``upcycle`` (``workbench.upcycle`` keywords) when the parent is dense."""

    name: str
    seed: int
    model: ModelConfig
    train: TrainConfig
    parent: str | None = None
    upcycle: dict[str, Any] | None = None
    part: str = "upcycling"  # or "finetuning"
    flops_offset: int = 0  # FLOPs before its first step (its lineage)
    diversity: bool = False  # record expert diversity at step 0 and every validation
    # TrainConfig fields set with init_from in the worker (what a fine-tune trains: trainable, esft_*)
    finetune: dict[str, Any] = field(default_factory=dict)


def _train_cfg(base: TrainConfig, steps: int, **changes: Any) -> TrainConfig:
    return replace(base, steps=steps, **changes)


def upcycling_specs(configs: dict[str, ModelConfig], train: TrainConfig, budget: Budget, seeds: list[int]
                    ) -> list[RunSpec]:
    """Part 1's runs per seed (module docstring), all on ``PRETRAIN_DOMAINS``, plus part 2's dense
    twin pretraining. ``train``: the shared recipe (batch, learning rate, validation cadence)."""
    pre = replace(train, train_domains=PRETRAIN_DOMAINS)
    specs = []
    for seed in seeds:
        t = replace(pre, seed=seed)
        specs.append(RunSpec(name=DENSE, seed=seed, model=configs["dense"], train=_train_cfg(t, budget.steps[DENSE])))
        specs.append(RunSpec(name=SCRATCH, seed=seed, model=configs["coarse"], diversity=True,
                             train=_train_cfg(t, budget.steps[SCRATCH])))
        for arm in UPCYCLED:
            specs.append(RunSpec(name=arm, seed=seed, model=configs[ARM_MODEL[arm]], parent=DENSE,
                                 upcycle={**UPCYCLE_METHODS[arm], "seed": seed}, diversity=True,
                                 flops_offset=budget.offset[arm], train=_train_cfg(t, budget.steps[arm])))
        specs.append(RunSpec(name=CONTINUED, seed=seed, model=configs["dense"], parent=DENSE,
                             flops_offset=budget.offset[CONTINUED], train=_train_cfg(t, budget.steps[CONTINUED])))
        specs.append(RunSpec(name=TWIN, seed=seed, model=configs["twin"], part="finetuning",
                             train=_train_cfg(t, budget.steps[TWIN])))
    return specs


def finetune_specs(configs: dict[str, ModelConfig], train: TrainConfig, seeds: list[int], *, steps: int,
                   methods: dict[str, dict[str, Any]] | None = None) -> list[RunSpec]:
    """Part 2's fine-tunes per seed: each of ``methods`` (default ``FINETUNES``) from ``MoE from
    scratch``, and full fine-tuning of the dense twin, ``steps`` steps on ``NEW_DOMAIN`` only at
    ``FINETUNE_LR``."""
    methods = FINETUNES if methods is None else methods
    ft = replace(train, train_domains=(NEW_DOMAIN,), lr=FINETUNE_LR, warmup_steps=min(FINETUNE_WARMUP, steps),
                 steps=steps)
    specs = []
    for seed in seeds:
        t = replace(ft, seed=seed)
        for name, fields_ in methods.items():
            specs.append(RunSpec(name=name, seed=seed, model=configs["coarse"], parent=SCRATCH, part="finetuning",
                                 train=t, finetune=dict(fields_)))
        specs.append(RunSpec(name=TWIN_FINETUNE, seed=seed, model=configs["twin"], parent=TWIN, part="finetuning",
                             train=t))
    return specs


# --- the run cache -------------------------------------------------------------------------------------

_NOT_IN_KEY = ("run_dir", "progress", "wandb_project", "checkpoint_every", "keep_checkpoints", "init_from")


def _source_hash() -> str:
    """What a run's result depends on beyond its configs: the training code (``code_version``), the
    upcycling code and this lab's worker."""
    from workbench.experiments import code_version

    digest = hashlib.sha256(code_version().encode())
    upcycle = Path(__file__).resolve().parents[1] / "upcycle.py"
    if upcycle.is_file():
        digest.update(upcycle.read_bytes())
    for obj in (_run_one, _Recorder, expert_weight_similarity, routing_similarity):
        digest.update(inspect.getsource(obj).encode())
    return digest.hexdigest()[:16]


def run_keys(specs: list[RunSpec]) -> dict[tuple[str, int], str]:
    """Each run's cache key: a hash of its configs, its parent's key (so a changed parent retrains
    its children), how it is upcycled and the code (``_source_hash``)."""
    version = _source_hash()
    keys: dict[tuple[str, int], str] = {}
    pending = list(specs)
    while pending:
        progressed = False
        for spec in list(pending):
            parent = None if spec.parent is None else keys.get((spec.parent, spec.seed))
            if spec.parent is not None and parent is None:
                continue
            train = {k: v for k, v in spec.train.to_dict().items() if k not in _NOT_IN_KEY}
            blob = json.dumps({"model": spec.model.to_dict(), "train": train, "parent": parent,
                               "upcycle": spec.upcycle, "finetune": spec.finetune, "diversity": spec.diversity,
                               "code": version},
                              sort_keys=True, default=str)
            keys[(spec.name, spec.seed)] = hashlib.sha256(blob.encode()).hexdigest()[:12]
            pending.remove(spec)
            progressed = True
        missing = sorted({(s.parent, s.seed) for s in pending})
        check(progressed or not pending, "specs", "name parents that are not among the runs", missing)
    return keys


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_dir_for(spec: RunSpec, key: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / STEM / f"{_slug(spec.name)}-seed{spec.seed}-{key}"


RECORD_FILE = "lifecycle.json"


def _finished(run_dir: Path) -> bool:
    from workbench.train.rundir import read_run_info

    try:
        info = read_run_info(run_dir)
    except Exception:  # an unreadable run.json: train again
        return False
    return info is not None and info.get("status") == "finished" and (run_dir / RECORD_FILE).is_file()


# Which ready run starts first: the long from-scratch runs (part 2's parents), then the dense ones
# whose children wait, the fine-tunes last (short: they fill the end of the schedule).
_PRIORITY = {SCRATCH: 0, DENSE: 1, TWIN: 2, COPY: 3, DROP: 3, GRANULAR: 3, CONTINUED: 4}


def run_all(specs: list[RunSpec], cache_dir: str | Path, *, jobs: int = 2, say=print) -> dict[tuple[str, int], Path]:
    """Train every run (or find it in the cache), parents before children, ``jobs`` at a time in
    worker processes with an equal share of the CPU threads; each run's directory."""
    import concurrent.futures as cf

    keys = run_keys(specs)
    dirs = {(s.name, s.seed): run_dir_for(s, keys[(s.name, s.seed)], cache_dir) for s in specs}
    done = {k for k, d in dirs.items() if _finished(d)}
    if done:
        say(f"{len(done)} of {len(specs)} runs from the cache ({Path(cache_dir) / STEM})")
    todo = [s for s in specs if (s.name, s.seed) not in done]
    if not todo:
        return dirs

    def ready(spec: RunSpec) -> bool:
        return spec.parent is None or (spec.parent, spec.seed) in done

    def payload(spec: RunSpec) -> dict[str, Any]:
        parent = None if spec.parent is None else str(dirs[(spec.parent, spec.seed)])
        return {"name": spec.name, "model": spec.model.to_dict(),
                "train": replace(spec.train, run_dir=str(dirs[(spec.name, spec.seed)]), progress=False).to_dict(),
                "parent": parent, "upcycle": spec.upcycle, "finetune": spec.finetune, "diversity": spec.diversity}

    t0 = time.perf_counter()
    n_total = len(todo)
    if jobs <= 1:
        while todo:
            spec = min((s for s in todo if ready(s)), key=lambda s: (_PRIORITY.get(s.name, 9), s.seed))
            todo.remove(spec)
            say(f"[{n_total - len(todo)}/{n_total}] training {spec.name}, seed {spec.seed} ({spec.train.steps} steps)")
            wall = _run_one(payload(spec))
            done.add((spec.name, spec.seed))
            say(f"  {spec.name}, seed {spec.seed}: {wall:.0f} s")
        return dirs
    from joblib.externals.loky import get_reusable_executor

    from workbench.labs.generation import _worker_init

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = get_reusable_executor(max_workers=jobs, initializer=_worker_init, initargs=(threads,), reuse=False)
    running: dict[Any, RunSpec] = {}
    started = 0
    try:
        while todo or running:
            for spec in sorted((s for s in todo if ready(s)), key=lambda s: (_PRIORITY.get(s.name, 9), s.seed)):
                if len(running) >= jobs:
                    break
                todo.remove(spec)
                started += 1
                say(f"[{started}/{n_total}] training {spec.name}, seed {spec.seed} ({spec.train.steps} steps)")
                running[pool.submit(_run_one, payload(spec))] = spec
            check(bool(running), "specs", "have runs whose parent never trains", [(s.name, s.seed) for s in todo])
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                spec = running.pop(fut)
                wall = fut.result()
                done.add((spec.name, spec.seed))
                say(f"  {spec.name}, seed {spec.seed}: {wall:.0f} s (all: {time.perf_counter() - t0:.0f} s)")
    finally:
        pool.shutdown(wait=True, kill_workers=True)
    return dirs


# --- what a run records (in the worker) ------------------------------------------------------------


def _cosine_offdiag(x_NP: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of rows of ``x_NP`` (a zero row counts 0)."""
    n = x_NP.shape[0]
    if n < 2:
        return float("nan")
    x = x_NP.double()
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = unit @ unit.T
    i, j = torch.triu_indices(n, n, offset=1)
    return float(sim[i, j].mean())


@torch.no_grad()
def expert_weight_similarity(model: Any) -> list[float]:
    """Per MoE layer: the mean pairwise cosine similarity of the experts' flattened weights (gate,
    up and down projections of each expert, one vector). 1: identical experts (plain copies)."""
    out = []
    for layer in model.moe_layers():
        ex = layer.experts
        w_EP = torch.cat([ex.w1.flatten(1), ex.w3.flatten(1), ex.w2.flatten(1)], dim=1)
        out.append(_cosine_offdiag(w_EP))
    return out


def routing_similarity(counts_LDE: Any) -> list[float]:
    """Per MoE layer: the mean pairwise cosine similarity of the experts' routing profiles over the
    validation domains, from the (layers, domains, experts) assignment counts the trainer's
    validation gives. Expert e's profile is, for every domain, the share of that domain's
    assignments that go to e. 1: every expert takes the same share of every domain (the router
    treats them alike); lower: experts take different domains (Nakamura et al. 2025 show
    Drop-Upcycling's experts diverging this way, plain copies' staying alike)."""
    counts = torch.as_tensor(counts_LDE, dtype=torch.float64)
    shares = counts / counts.sum(dim=2, keepdim=True).clamp_min(1)
    return [_cosine_offdiag(layer.T) for layer in shares]


class _Recorder:
    """``Trainer.fit`` callback of a lab run: at step 0 (``record``) and at every validation, the
    validation's losses and routing matrix and, when asked, the experts' weight and routing
    similarity."""

    def __init__(self, trainer: Any, diversity: bool):
        self.diversity = diversity and trainer.model_cfg.moe is not None
        self.rows: list[dict[str, Any]] = []

    def record(self, trainer: Any) -> None:
        ev = trainer.last_eval
        row: dict[str, Any] = {"step": trainer.step, "val_loss": ev.loss, "loss_per_domain": dict(ev.loss_per_domain),
                               "domains": list(ev.domains)}
        if trainer.model_cfg.moe is not None:
            row["routing_matrix"] = ev.routing_matrix.tolist()
        if self.diversity:
            row["weight_similarity"] = expert_weight_similarity(trainer.model)
            row["routing_similarity"] = routing_similarity(ev.routing_matrix)
        self.rows.append(row)

    def __call__(self, trainer: Any, row: dict[str, Any]) -> None:
        if "val/loss" in row:
            self.record(trainer)


def _trainable_count(trainer: Any) -> int:
    """Parameter values the run trains: the trainer's ``Freezing`` record (an ESFT run trains slices
    of the stacked expert tensors, which ``requires_grad`` cannot tell)."""
    freezing = getattr(trainer, "freezing", None)
    if freezing is not None:
        return int(freezing.trainable)
    return sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def _run_one(payload: dict[str, Any]) -> float:
    """Train one lab run (in a worker process): upcycle the parent when asked, train from it, and
    write what ``_Recorder`` saw to ``RECORD_FILE`` in the run directory; the wall time in s."""
    from workbench.train.trainer import Trainer

    t0 = time.perf_counter()
    model_cfg = ModelConfig.from_dict(payload["model"])
    train = dict(payload["train"])
    run_dir = Path(train["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if payload["upcycle"] is not None:
        from workbench.upcycle import upcycle_checkpoint

        init = Path(f"{run_dir}.init")
        init.mkdir(exist_ok=True)
        train["init_from"] = str(upcycle_checkpoint(payload["parent"], init, model_cfg, **payload["upcycle"]))
    elif payload["parent"] is not None:
        train["init_from"] = payload["parent"]
    train.update(payload["finetune"])
    trainer = Trainer(model_cfg, TrainConfig.from_dict(train), overwrite=True)
    recorder = _Recorder(trainer, payload["diversity"])
    trainer.evaluate()  # step 0: the weights the run starts from
    recorder.record(trainer)
    trainer.fit(callback=recorder)
    wall = time.perf_counter() - t0
    record = {"name": payload["name"], "evals": recorder.rows, "trainable_params": _trainable_count(trainer),
              "num_params": model_cfg.num_params(), "wall_s": wall, "threads": torch.get_num_threads(),
              "esft_experts": _esft_experts(trainer)}
    (run_dir / RECORD_FILE).write_text(json.dumps(record) + "\n")
    return wall


def _esft_experts(trainer: Any) -> list[list[int]] | None:
    """The experts an ESFT run trains, per MoE layer (None for every other run)."""
    freezing = getattr(trainer, "freezing", None)
    selection = None if freezing is None else freezing.selection
    return None if selection is None else [[int(e) for e in layer] for layer in selection]


# --- tables from the runs -------------------------------------------------------------------------


def in_domain_loss(loss_per_domain: dict[str, float], domains: tuple[str, ...] = PRETRAIN_DOMAINS) -> float:
    """The mean validation loss over ``domains`` (each domain has the same number of validation
    windows, so this is the token-weighted mean over them)."""
    values = [loss_per_domain[d] for d in domains if d in loss_per_domain]
    return sum(values) / len(values) if len(values) == len(domains) else float("nan")


def collect(specs: list[RunSpec], dirs: dict[tuple[str, int], Path], budget: Budget) -> dict[str, Any]:
    """The lab's tables from the run directories: ``curves`` (one row per run and validation, with
    its cumulative FLOPs), ``diversity`` (per run, validation and MoE layer), ``runs`` (one row per
    run: steps, FLOPs, trainable parameters, wall time) and ``routing`` (each run's domain x expert
    counts at its first and last validation)."""
    import pandas as pd

    curves, diversity, runs, routing = [], [], [], []
    for spec in specs:
        rec = json.loads((dirs[(spec.name, spec.seed)] / RECORD_FILE).read_text())
        step_flops = spec.model.flops_per_token() * budget.tokens_per_step
        for ev in rec["evals"]:
            flops = spec.flops_offset + ev["step"] * step_flops
            curves.append({"name": spec.name, "seed": spec.seed, "part": spec.part, "step": ev["step"],
                           "flops": flops, "val_loss": ev["val_loss"],
                           "in_domain": in_domain_loss(ev["loss_per_domain"]),
                           "new_domain": ev["loss_per_domain"].get(NEW_DOMAIN, float("nan")),
                           **{f"val/{d}": v for d, v in ev["loss_per_domain"].items()}})
            for layer, (w, r) in enumerate(zip(ev.get("weight_similarity", []), ev.get("routing_similarity", []),
                                               strict=True)):
                diversity.append({"name": spec.name, "seed": spec.seed, "step": ev["step"], "flops": flops,
                                  "layer": layer, "weight_similarity": w, "routing_similarity": r})
        evals = rec["evals"]
        for when, ev in (("before", evals[0]), ("after", evals[-1])):
            if "routing_matrix" in ev:
                routing.append({"name": spec.name, "seed": spec.seed, "when": when, "step": ev["step"],
                                "domains": ev["domains"], "matrix": ev["routing_matrix"]})
        runs.append({"name": spec.name, "seed": spec.seed, "part": spec.part, "parent": spec.parent,
                     "steps": spec.train.steps, "flops_per_token": spec.model.flops_per_token(),
                     "flops": spec.flops_offset + spec.train.steps * step_flops,
                     "num_params": rec["num_params"], "trainable_params": rec["trainable_params"],
                     "wall_s": rec["wall_s"], "esft_experts": rec.get("esft_experts")})
    return {"curves": pd.DataFrame(curves), "diversity": pd.DataFrame(diversity), "runs": pd.DataFrame(runs),
            "routing": routing}


def final_frame(curves: Any) -> Any:
    """The last validation of every run (one row per run)."""
    last = curves.sort_values("step").groupby(["name", "seed"], sort=False).tail(1)
    return last.set_index(["name", "seed"]).sort_index()


# --- statistics -----------------------------------------------------------------------------------------


def paired(values_a: dict[int, float], values_b: dict[int, float]) -> dict[str, Any]:
    """a - b per seed over the seeds both have: the per-seed differences, their mean, standard
    deviation and standard error (std / sqrt(n)); NaN spread with one seed."""
    seeds = sorted(set(values_a) & set(values_b))
    check(len(seeds) > 0, "seeds", "the two arms share no seed", (sorted(values_a), sorted(values_b)))
    d = [float(values_a[s]) - float(values_b[s]) for s in seeds]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    return {"seeds": seeds, "per_seed": dict(zip(seeds, d, strict=True)), "mean": mean, "std": std,
            "se": std / math.sqrt(n) if n > 1 else float("nan")}


def mean_std(values: dict[int, float]) -> tuple[float, float]:
    v = [float(x) for x in values.values()]
    n = len(v)
    mean = sum(v) / n
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan"))


def lower(diff: dict[str, Any]) -> bool | None:
    """The difference is negative beyond seed noise: mean < -NOISE_SE x SE (None: one seed)."""
    if math.isnan(diff["se"]):
        return None
    return bool(diff["mean"] < -NOISE_SE * diff["se"])


def not_lower(diff: dict[str, Any]) -> bool | None:
    """No lower within seed noise: mean >= -NOISE_SE x SE (None: one seed)."""
    if math.isnan(diff["se"]):
        return None
    return bool(diff["mean"] >= -NOISE_SE * diff["se"])


def _z(diff: dict[str, Any]) -> str:
    se = diff["se"]
    if math.isnan(se):
        return "no SE with one seed"
    if se == 0:
        return "SE 0"
    return f"{diff['mean'] / se:+.1f} paired SE"


def _fmt_diff(diff: dict[str, Any], digits: int = 4) -> str:
    per = ", ".join(f"{v:+.{digits}f}" for v in diff["per_seed"].values())
    spread = "" if math.isnan(diff["std"]) else f" ± {diff['std']:.{digits}f} (std), SE {diff['se']:.{digits}f}"
    return f"{diff['mean']:+.{digits}f}{spread} = {_z(diff)} (per seed: {per})"


def _outcome(holds: bool | None) -> str:
    return {None: "CANNOT BE JUDGED with one seed", True: "REPRODUCED at this scale",
            False: "NOT REPRODUCED at this scale"}[holds]


def _by_seed(final: Any, name: str, metric: str) -> dict[int, float]:
    rows = final.loc[name]
    return {int(s): float(v) for s, v in rows[metric].items()}


# --- the claims of part 1 -----------------------------------------------------------------------------


def crossover(curves: Any, seed: int, upcycled: str = COPY, scratch: str = SCRATCH,
              metric: str = "in_domain") -> float | None:
    """The FLOPs from which the from-scratch curve stays at or below the upcycled one, to the end of
    the budget: the first validation point of ``upcycled`` from which on the from-scratch loss
    (linearly interpolated at the same FLOPs) is <= the upcycled loss at every later point. None:
    from scratch has not caught up by the end of the budget."""
    up = curves[(curves["name"] == upcycled) & (curves["seed"] == seed)].sort_values("flops")
    sc = curves[(curves["name"] == scratch) & (curves["seed"] == seed)].sort_values("flops")
    if up.empty or sc.empty:
        return None
    xs, ys = sc["flops"].to_numpy(dtype=float), sc[metric].to_numpy(dtype=float)
    points = [(float(x), float(y)) for x, y in zip(up["flops"], up[metric], strict=True) if xs[0] <= x <= xs[-1]]
    caught = None
    for x, y in reversed(points):
        s = float(_interp(x, xs, ys))
        if s <= y:
            caught = x
        else:
            break
    return caught


def _interp(x: float, xs: Any, ys: Any) -> float:
    import numpy as np

    return float(np.interp(x, xs, ys))


def upcycling_claims(curves: Any, budget: Budget | None = None) -> dict[str, Any]:
    """Part 1's claim (a): ``upcycled copy`` against ``MoE from scratch`` and ``dense continued``
    at equal total compute, on the final in-domain loss, and the crossover per seed."""
    final = final_frame(curves)
    up = _by_seed(final, COPY, "in_domain")
    out: dict[str, Any] = {"metric": "in_domain"}
    for key, other in (("vs_scratch", SCRATCH), ("vs_dense", CONTINUED)):
        theirs = _by_seed(final, other, "in_domain")
        diff = paired(up, theirs)
        holds = lower(diff)
        out[key] = {"other": other, "upcycled": mean_std(up), "theirs": mean_std(theirs), "diff": diff,
                    "holds": holds}
        out[key]["verdict"] = (
            f"Upcycling beats {other} at equal compute (dense pretraining counted): final in-domain validation loss "
            f"{_ms(up)} (upcycled copy) vs {_ms(theirs)} ({other}); upcycled - {other} = {_fmt_diff(diff)}; "
            f"threshold < -{NOISE_SE:g} paired SE: {_outcome(holds)}.")
    seeds = sorted(up)
    crosses = {s: crossover(curves, s) for s in seeds}
    total = float(final.loc[COPY]["flops"].max())
    found = [s for s, x in crosses.items() if x is not None]
    where = ", ".join(f"seed {s}: " + (f"{x:.3g} FLOPs ({x / total:.0%} of the budget)" if x is not None else "none")
                      for s, x in crosses.items())
    if len(found) == len(seeds):
        said = "from scratch catches up with the upcycled MoE within the budget in every seed"
    elif not found:
        said = "from scratch does not catch up with the upcycled MoE within the budget in any seed"
    else:
        said = f"from scratch catches up within the budget in {len(found)} of {len(seeds)} seeds"
    out["crossover"] = {"per_seed": crosses, "budget_flops": total, "caught_up": len(found), "seeds": len(seeds),
                        "verdict": f"Crossover (OLMoE's argument): {said} ({where})."}
    return out


def _ms(values: dict[int, float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def final_diversity(diversity: Any) -> Any:
    """Per (run, seed): the mean over MoE layers of the weight and routing similarity at the last
    validation."""
    last = diversity[diversity["step"] == diversity.groupby(["name", "seed"])["step"].transform("max")]
    return last.groupby(["name", "seed"])[["weight_similarity", "routing_similarity"]].mean()


def drop_claims(curves: Any, diversity: Any) -> dict[str, Any]:
    """Claim (b): ``upcycled drop`` against ``upcycled copy``: expert weight and routing similarity at
    the end (lower beyond noise), and the final in-domain loss (lower beyond noise)."""
    final, div = final_frame(curves), final_diversity(diversity)
    out: dict[str, Any] = {}
    parts = []
    for key, table, metric, what in (("weights", div, "weight_similarity", "expert weight similarity"),
                                     ("routing", div, "routing_similarity", "expert routing similarity"),
                                     ("loss", final, "in_domain", "final in-domain validation loss")):
        drop, copy = _by_seed(table, DROP, metric), _by_seed(table, COPY, metric)
        diff = paired(drop, copy)
        holds = lower(diff)
        out[key] = {"drop": mean_std(drop), "copy": mean_std(copy), "diff": diff, "holds": holds}
        parts.append(f"{what} {_ms(drop)} (drop) vs {_ms(copy)} (copy), drop - copy = {_fmt_diff(diff)}: "
                     + ("lower beyond seed noise" if holds else "not lower beyond seed noise" if holds is not None
                        else "not judged"))
    holds = [out[k]["holds"] for k in ("weights", "routing", "loss")]
    out["holds"] = None if None in holds else all(holds)
    out["verdict"] = (f"Drop-Upcycling diversifies experts and trains better than plain copies: {'; '.join(parts)} "
                      f"(threshold < -{NOISE_SE:g} paired SE for each): {_outcome(out['holds'])}.")
    return out


def granular_claim(curves: Any) -> dict[str, Any]:
    """Claim (c): ``upcycled granular`` reaches a lower final in-domain loss than ``upcycled copy``."""
    final = final_frame(curves)
    gran, copy = _by_seed(final, GRANULAR, "in_domain"), _by_seed(final, COPY, "in_domain")
    diff = paired(gran, copy)
    holds = lower(diff)
    return {"granular": mean_std(gran), "coarse": mean_std(copy), "diff": diff, "holds": holds,
            "verdict": (f"Granular upcycling beats coarse upcycling: final in-domain validation loss {_ms(gran)} "
                        f"(granular) vs {_ms(copy)} (coarse copy); granular - coarse = {_fmt_diff(diff)}; threshold "
                        f"< -{NOISE_SE:g} paired SE: {_outcome(holds)}.")}


def restart_table(curves: Any) -> Any:
    """The arms that start from the dense checkpoint, per arm (mean ± std over seeds): the in-domain
    loss at their step 0 beside the dense run's final loss (paired difference and SE: 0 when the
    upcycled model computes the dense function), and the highest loss the run reaches after step
    0, with its step (a new warmup to the peak learning rate can undo some of the start)."""
    import pandas as pd

    final = final_frame(curves)
    dense = _by_seed(final, DENSE, "in_domain")
    rows = []
    for arm in (*UPCYCLED, CONTINUED):
        runs = curves[curves["name"] == arm]
        if runs.empty:
            continue
        start, peak, peak_step = {}, {}, {}
        for seed, g in runs.groupby("seed"):
            g = g.sort_values("step")
            start[int(seed)] = float(g["in_domain"].iloc[0])
            later = g.iloc[1:] if len(g) > 1 else g
            top = later.loc[later["in_domain"].idxmax()]
            peak[int(seed)], peak_step[int(seed)] = float(top["in_domain"]), int(top["step"])
        diff = paired(start, dense)
        rise = paired(peak, start)
        rows.append({"arm": arm, "step0_loss": mean_std(start)[0], "step0_loss_std": mean_std(start)[1],
                     "step0_minus_dense": diff["mean"], "step0_minus_dense_se": diff["se"],
                     "peak_minus_step0": rise["mean"], "peak_minus_step0_se": rise["se"],
                     "peak_step": sum(peak_step.values()) / len(peak_step)})
    return pd.DataFrame(rows).set_index("arm")


def budget_table(runs: Any) -> Any:
    """Part 1's runs: steps, FLOPs per token and total training FLOPs (mean over seeds: equal)."""
    part1 = runs[runs["name"].isin(PART1)]
    table = part1.groupby("name", sort=False)[["steps", "flops_per_token", "flops", "num_params"]].first()
    table["flops / upcycled copy"] = table["flops"] / table.loc[COPY, "flops"] if COPY in table.index else float("nan")
    return table.reindex([n for n in PART1 if n in table.index])


# --- part 2: fine-tuning ---------------------------------------------------------------------------------


def finetune_frame(curves: Any, runs: Any) -> Any:
    """One row per (fine-tune, seed): per-domain validation loss before (the run's step 0, the
    pretrained weights) and after, ``gain`` on ``NEW_DOMAIN`` (before - after: positive is better),
    ``forgetting`` (mean over ``PRETRAIN_DOMAINS`` of after - before: positive is worse) and the
    trainable parameters."""
    import pandas as pd

    ft = curves[curves["part"] == "finetuning"]
    names = [*FINETUNES, TWIN_FINETUNE]
    rows = []
    info = runs.set_index(["name", "seed"])
    for (name, seed), g in ft[ft["name"].isin(names)].groupby(["name", "seed"], sort=False):
        g = g.sort_values("step")
        before, after = g.iloc[0], g.iloc[-1]
        row: dict[str, Any] = {"method": name, "seed": int(seed)}
        for d in (*PRETRAIN_DOMAINS, NEW_DOMAIN):
            row[f"before/{d}"], row[f"after/{d}"] = float(before[f"val/{d}"]), float(after[f"val/{d}"])
        row["gain"] = row[f"before/{NEW_DOMAIN}"] - row[f"after/{NEW_DOMAIN}"]
        changes = [row[f"after/{d}"] - row[f"before/{d}"] for d in PRETRAIN_DOMAINS]
        row["forgetting"] = sum(changes) / len(changes)
        row["trainable_params"] = int(info.loc[(name, seed), "trainable_params"])
        row["num_params"] = int(info.loc[(name, seed), "num_params"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    order = {n: i for i, n in enumerate(names)}
    return frame.sort_values(["method", "seed"], key=lambda c: c.map(order) if c.name == "method" else c)


def finetune_table(frame: Any) -> Any:
    """Per method: trainable parameters (and their share), gain and forgetting (mean, std over
    seeds), and each one's paired difference from full fine-tuning (mean and SE)."""
    import pandas as pd

    rows = []
    full = frame[frame["method"] == "full"].set_index("seed")
    for method, g in frame.groupby("method", sort=False):
        g = g.set_index("seed")
        row: dict[str, Any] = {"method": method, "trainable_params": int(g["trainable_params"].iloc[0]),
                               "trainable_share": float(g["trainable_params"].iloc[0] / g["num_params"].iloc[0])}
        for m in ("gain", "forgetting", f"after/{NEW_DOMAIN}"):
            row[m], row[f"{m}_std"] = mean_std(g[m].to_dict())
        if method != TWIN_FINETUNE and len(full):
            for m in ("gain", "forgetting"):
                diff = paired(g[m].to_dict(), full[m].to_dict())
                row[f"{m}_vs_full"], row[f"{m}_vs_full_se"] = diff["mean"], diff["se"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def finetune_claims(frame: Any) -> dict[str, Any]:
    """The ST-MoE and ESFT claims (module docstring) on ``finetune_frame``'s rows."""
    def by(method: str, metric: str) -> dict[int, float]:
        g = frame[frame["method"] == method].set_index("seed")
        return {int(s): float(v) for s, v in g[metric].items()}

    out: dict[str, Any] = {}
    full_gain, full_forget = by("full", "gain"), by("full", "forgetting")
    name = "non-MoE only (ST-MoE)"
    diff = paired(by(name, "gain"), full_gain)
    holds = not_lower(diff)
    out["st_moe"] = {"diff": diff, "holds": holds, "verdict": (
        f"ST-MoE: fine-tuning the non-MoE parameters only gains on {NEW_DOMAIN} no less than full fine-tuning: gain "
        f"{_ms(by(name, 'gain'))} vs {_ms(full_gain)} nats/byte; non-MoE - full = {_fmt_diff(diff)}; threshold >= "
        f"-{NOISE_SE:g} paired SE: {_outcome(holds)}.")}
    gain, forget = paired(by("ESFT", "gain"), full_gain), paired(by("ESFT", "forgetting"), full_forget)
    g_ok, f_ok = not_lower(gain), lower(forget)
    holds = None if g_ok is None or f_ok is None else bool(g_ok and f_ok)
    out["esft"] = {"gain": gain, "forgetting": forget, "gain_holds": g_ok, "forgetting_holds": f_ok, "holds": holds,
                   "verdict": (
        f"ESFT: fine-tuning the experts {NEW_DOMAIN} routes to most (top-p {ESFT_TOP_P:g}) gains as much as full "
        f"fine-tuning and forgets less: gain {_ms(by('ESFT', 'gain'))} vs {_ms(full_gain)}, ESFT - full = "
        f"{_fmt_diff(gain)} ({'no lower within' if g_ok else 'lower beyond'} seed noise, threshold -{NOISE_SE:g} SE); "
        f"forgetting "
        f"{_ms(by('ESFT', 'forgetting'))} vs {_ms(full_forget)}, ESFT - full = {_fmt_diff(forget)} "
        f"({'lower' if f_ok else 'not lower'} beyond seed noise, threshold -{NOISE_SE:g} SE): {_outcome(holds)}.")}
    return out


def routing_shift(routing: list[dict[str, Any]], name: str, domain: str = NEW_DOMAIN) -> Any:
    """Per seed and MoE layer of run ``name``: the share of ``domain``'s assignments each expert
    gets before and after, and the total variation distance between the two (0: unchanged, 1:
    disjoint experts)."""
    import pandas as pd

    rows = []
    by_seed: dict[int, dict[str, Any]] = {}
    for r in routing:
        if r["name"] == name:
            by_seed.setdefault(int(r["seed"]), {})[r["when"]] = r
    for seed, pair in sorted(by_seed.items()):
        if "before" not in pair or "after" not in pair:
            continue
        d = pair["before"]["domains"].index(domain)
        for layer, (mb, ma) in enumerate(zip(pair["before"]["matrix"], pair["after"]["matrix"], strict=True)):
            b, a = torch.tensor(mb[d], dtype=torch.float64), torch.tensor(ma[d], dtype=torch.float64)
            b, a = b / b.sum().clamp_min(1), a / a.sum().clamp_min(1)
            rows.append({"name": name, "seed": seed, "layer": layer, "tv_distance": float(0.5 * (a - b).abs().sum()),
                         "top_expert_before": int(b.argmax()), "top_expert_after": int(a.argmax()),
                         "top_share_before": float(b.max()), "top_share_after": float(a.max()),
                         "before": b.tolist(), "after": a.tolist()})
    return pd.DataFrame(rows)


# --- figures -----------------------------------------------------------------------------------------

ARM_COLOURS = {DENSE: "black", CONTINUED: "grey", SCRATCH: "tab:red", COPY: "tab:blue", DROP: "tab:green",
               GRANULAR: "tab:purple", TWIN: "tab:brown"}


def plot_curves(curves: Any, metric: str = "in_domain", ax=None, crossovers: dict[int, float | None] | None = None):
    """Validation loss against cumulative training FLOPs for every arm of part 1: the mean over
    seeds (interpolated at the first seed's points), each seed faint; the dense pretraining that
    the upcycled arms and the continued dense start from is the black curve."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4.5))
    for arm in PART1:
        rows = curves[curves["name"] == arm]
        if rows.empty:
            continue
        colour = ARM_COLOURS[arm]
        seeds = sorted(rows["seed"].unique())
        for s in seeds:
            r = rows[rows["seed"] == s].sort_values("flops")
            ax.plot(r["flops"], r[metric], color=colour, lw=0.6, alpha=0.35)
        mean = rows.groupby("step").agg(flops=("flops", "mean"), loss=(metric, "mean")).sort_values("flops")
        ax.plot(mean["flops"], mean["loss"], color=colour, lw=2, label=f"{arm} ({len(seeds)} seeds)")
    for x in (crossovers or {}).values():
        if x is not None:
            ax.axvline(x, color="tab:red", ls=":", lw=1)
    ax.set_xlabel("training FLOPs (cumulative, dense pretraining included)")
    ax.set_ylabel("validation loss, pretraining domains" if metric == "in_domain" else metric)
    ax.set_title("loss against training compute", fontsize=10)
    ax.legend(fontsize=8)
    return ax.figure


def plot_diversity(diversity: Any, axes=None):
    """Expert weight similarity and routing similarity (mean over MoE layers, mean over seeds ±
    std) against the steps since upcycling, for the upcycled arms and from scratch."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    per_run = diversity.groupby(["name", "seed", "step"])[["weight_similarity", "routing_similarity"]].mean()
    for ax, metric, title in ((axes[0], "weight_similarity", "expert weights: mean pairwise cosine"),
                              (axes[1], "routing_similarity", "expert routing: mean pairwise cosine")):
        for arm in (*UPCYCLED, SCRATCH):
            if arm not in per_run.index.get_level_values(0):
                continue
            g = per_run.loc[arm].groupby("step")[metric].agg(["mean", "std"]).fillna(0)
            ax.plot(g.index, g["mean"], "-o", ms=3, color=ARM_COLOURS[arm], label=arm)
            ax.fill_between(g.index, g["mean"] - g["std"], g["mean"] + g["std"], color=ARM_COLOURS[arm], alpha=0.15)
        ax.set_xlabel("steps of the run (0: as initialised)")
        ax.set_ylabel("cosine similarity")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    return axes[0].figure


def plot_finetune(table: Any, ax=None):
    """Gain on the new domain against forgetting of the old ones, per method (mean ± std over
    seeds), each labelled with its trainable parameters."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (method, r) in enumerate(table.iterrows()):
        colour = f"C{i}"
        ax.errorbar(r["forgetting"], r["gain"], xerr=r.get("forgetting_std", 0) or 0, yerr=r.get("gain_std", 0) or 0,
                    fmt="o", color=colour, capsize=3)
        ax.annotate(f"{method}: {int(r['trainable_params']):,} trained ({r['trainable_share']:.0%})",
                    (r["forgetting"], r["gain"]), textcoords="offset points", xytext=(6, 10 - 9 * (i % 3)), fontsize=7,
                    color=colour)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(f"forgetting: mean loss change on {', '.join(PRETRAIN_DOMAINS)} (nats/byte, lower is better)")
    ax.set_ylabel(f"gain on {NEW_DOMAIN} (nats/byte, higher is better)")
    ax.set_title("fine-tuning on a new domain: gain vs forgetting", fontsize=10)
    return ax.figure


def _shares(matrix_DE: Any) -> torch.Tensor:
    m = torch.tensor(matrix_DE, dtype=torch.float64)
    return m / m.sum(dim=1, keepdim=True).clamp_min(1)


def plot_routing_panels(routing: list[dict[str, Any]], names: list[str], seed: int, layer: int, axes=None):
    """Each domain's share of its assignments per expert in MoE layer ``layer`` at seed ``seed``:
    first before fine-tuning (the first run's step 0: every fine-tune starts from the same weights),
    then after each run of ``names``; one heatmap per panel on one colour scale (0 to the largest
    share), the new domain's row outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    at = {(r["name"], r["when"]): r for r in routing if int(r["seed"]) == seed}
    panels = [("before fine-tuning", at[(names[0], "before")])] + [(f"after: {n}", at[(n, "after")]) for n in names]
    if axes is None:
        _, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels)))
    top = max(float(_shares(r["matrix"][layer]).max()) for _, r in panels)
    for ax, (title, r) in zip(axes, panels, strict=True):
        share = _shares(r["matrix"][layer])
        im = ax.imshow(share.numpy(), cmap="viridis", vmin=0, vmax=top, aspect="auto")
        ax.set_yticks(range(len(r["domains"])), r["domains"], fontsize=8)
        ax.set_xticks(range(share.shape[1]))
        if NEW_DOMAIN in r["domains"]:
            row = r["domains"].index(NEW_DOMAIN)
            ax.add_patch(Rectangle((-0.5, row - 0.5), share.shape[1], 1, fill=False, ec="red", lw=1.5))
        ax.set_title(f"{title} (seed {seed}, MoE layer {layer}, step {r['step']})", fontsize=9)
        ax.figure.colorbar(im, ax=ax, fraction=0.03)
    axes[-1].set_xlabel("expert")
    return axes[0].figure


def closing_note(claims: dict[str, Any], finetune: Any) -> list[str]:
    """The notebook's closing note: every claim's verdict (mean, spread, paired SE, per seed), the
    fine-tuning table in words, and the commands that reproduce the results."""
    lines = ["Claims (thresholds fixed in workbench/labs/lifecycle.py before any run; mean ± std over seeds, "
             "paired SE of the per-seed differences):"]
    up = claims.get("upcycling", {})
    for key in ("vs_scratch", "vs_dense", "crossover"):
        if key in up:
            lines.append(f"- (a) {up[key]['verdict']}")
    if "drop" in claims:
        lines.append(f"- (b) {claims['drop']['verdict']}")
    if "granular" in claims:
        lines.append(f"- (c) {claims['granular']['verdict']}")
    for key in ("st_moe", "esft"):
        if key in claims.get("finetune", {}):
            lines.append(f"- (fine-tuning) {claims['finetune'][key]['verdict']}")
    lines.append(f"Fine-tuning on {NEW_DOMAIN} (gain: loss before - after on {NEW_DOMAIN}; forgetting: mean loss "
                 f"change on {', '.join(PRETRAIN_DOMAINS)}; mean ± std over seeds; vs full: paired mean ± SE):")
    for method, r in finetune.iterrows():
        vs = ""
        if "gain_vs_full" in r and method != "full" and r["gain_vs_full"] == r["gain_vs_full"]:
            vs = (f" (vs full: gain {r['gain_vs_full']:+.4f} ± {r['gain_vs_full_se']:.4f}, forgetting "
                  f"{r['forgetting_vs_full']:+.4f} ± {r['forgetting_vs_full_se']:.4f})")
        lines.append(f"- {method}: {int(r['trainable_params']):,} trainable parameters ({r['trainable_share']:.1%}); "
                     f"gain {r['gain']:+.4f} ± {r['gain_std']:.4f}, forgetting {r['forgetting']:+.4f} ± "
                     f"{r['forgetting_std']:.4f}{vs}")
    lines += ["Commands:",
              f"- results (the default, seconds): open notebooks/{STEM}.ipynb and Run All",
              f"- smoke: WORKBENCH_SMOKE=1 pytest --nbmake --nbmake-timeout=120 notebooks/{STEM}.ipynb",
              f"- full: WORKBENCH_MODE=full jupyter lab notebooks/{STEM}.ipynb, set SAVE_RESULTS = True, Run All "
              "(runs cached under runs/cache/; a re-run trains nothing)"]
    return lines


# --- the committed full-mode results ------------------------------------------------------------------------

RESULTS_FILES = ("results.json",)


def save_results(folder: str | Path, results: dict[str, Any], **kwargs: Any) -> Path:
    """``results`` (tables and plain data) to ``folder/results.json`` with date, machine, commit,
    command and runtime (``workbench.labs.generation.save_results``)."""
    return _save_results(folder, results, **kwargs)


def load_results(folder: str | Path) -> dict[str, Any]:
    """The committed full-mode results: the saved tables as DataFrames, the rest as saved."""
    import pandas as pd

    raw = _load_results(folder)
    out = dict(raw)
    for key in ("curves", "diversity", "runs"):
        if key in out:
            out[key] = pd.DataFrame(out[key])
    return out
