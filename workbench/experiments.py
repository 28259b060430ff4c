"""The experiment runner: a list of configs times seeds, every finished run cached on disk.

    runs = [Experiment("aux 1e-2", preset("tiny", aux_loss_weight=1e-2), TrainConfig(steps=300)),
            Experiment("loss-free", preset("tiny", aux_loss_weight=0, bias_update_rate=1e-3), ...)]
    results = run_experiments(runs, seeds=[0, 1, 2], cache_dir="runs/cache", jobs=2)
    results.runs     # one row per (experiment, seed): final validation loss, global MaxVio, ...
    results.steps    # one row per (experiment, seed, step): the training log's scalar columns
    results.evals    # one row per (experiment, seed, validation)
    results.detail("loss-free", 0)["bias"]   # per-step lists: router biases, expert loads

A run's result is memoised with joblib (``joblib.Memory``): its key hashes the run's full model
and training config (the seed included), the torch version and the source of the package code
that training runs (``code_version``). Calling again with the same list trains nothing; change
any config field or that code and the affected runs train again. Settings that do not change
the result (where checkpoints go, the progress bar, the wandb project) are not part of the key.
The cache holds plain Python data (tables and lists), never checkpoints: a run trains in a
temporary directory that is deleted when it ends.

``jobs > 1`` trains that many runs at once in worker processes, each with an equal share of the
CPU threads. On 2 CPU cores two single-threaded tiny runs make about 1.3x the tokens per second
of one run on two threads (measured: 8.2k + 8.2k vs 12.6k tokens/s), so sweeps of small models
default to one run per core.

Progress: a line per run as it starts (``[3/12] training aux 1e-2, seed 1``) or is found in the
cache, and one as it ends with its validation loss and global MaxVio.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import inspect
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from workbench.config import ModelConfig, MoEConfig
from workbench.moe.metrics import load_metrics
from workbench.train.config import TrainConfig
from workbench.validation import check

# Training-config fields that do not change what a run computes, so they are not in its key.
NOT_IN_KEY = ("run_dir", "progress", "wandb_project", "checkpoint_every", "keep_checkpoints")

# The package code a run's result depends on: everything but presentation and tooling. Of this
# file only what trains and records a run counts (``train_run`` and its recorders), so a change to
# how the tables are built reuses the cache.
_RESULT_CODE = ("__init__.py", "config.py", "model.py", "runtime.py", "validation.py", "moe", "train", "data")


def _require(module: str, extra: str = "experiments"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the experiment runner needs {module}: pip install 'moe-workbench[{extra}]' "
                          f"(or pip install {module})") from None


# --- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One configuration to train (at every seed of the sweep). ``tags`` become table columns."""

    name: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    tags: Mapping[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None  # None: the sweep's seeds

    def __post_init__(self) -> None:
        check(isinstance(self.name, str) and self.name.strip() != "", "name", "must be a non-empty string",
              self.name)
        check(isinstance(self.model, ModelConfig), "model", "must be a ModelConfig", type(self.model).__name__)
        check(isinstance(self.train, TrainConfig), "train", "must be a TrainConfig", type(self.train).__name__)
        # the tags become table columns: a string (tags: "x") would pass a dry run and fail after training
        check(isinstance(self.tags, Mapping) and all(isinstance(k, str) for k in self.tags), "tags",
              "must be a mapping of column names to values, e.g. {method: aux}", self.tags)
        reserved = {"name", "seed"} & set(self.tags)
        check(not reserved, "tags", "must not use the column names 'name' or 'seed'", sorted(reserved))
        if self.seeds is not None:
            _check_seeds(self.seeds)


def _check_seeds(seeds: Any) -> None:
    check(isinstance(seeds, list | tuple), "seeds", "must be a list of the seeds to run, such as [0, 1, 2] "
          "(a single number is not a count of seeds: write [3] to run seed 3 alone)", seeds)
    check(len(seeds) > 0 and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds), "seeds",
          "must be a non-empty list of integers", seeds)
    check(len(set(seeds)) == len(seeds), "seeds", "must not repeat", list(seeds))


def code_version(root: Path | None = None) -> str:
    """A hash of the package source that training runs (``_RESULT_CODE``) and the torch version.

    Editing a plot or the CLI keeps the cache; editing a router, a loss or the trainer retrains.
    ``root``: the package folder (default: this package).
    """
    root = Path(__file__).resolve().parent if root is None else Path(root)
    digest = hashlib.sha256(f"torch {torch.__version__}".encode())
    for entry in _RESULT_CODE:
        path = root / entry
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".cpp"):
                digest.update(str(f.relative_to(root)).encode())
                digest.update(f.read_bytes())
    for obj in (train_run, _both, _Recorder, _TraceRecorder, _capacity_eval):
        digest.update(inspect.getsource(obj).encode())
    return digest.hexdigest()[:16]


def _key_configs(experiment: Experiment, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    train = {k: v for k, v in replace(experiment.train, seed=seed).to_dict().items() if k not in NOT_IN_KEY}
    return experiment.model.to_dict(), train


def run_key(experiment: Experiment, seed: int, version: str | None = None, traces: bool = False) -> str:
    """The cache key of one run: a hash of its configs (seed included), the code version and
    whether it records routing traces."""
    joblib = _require("joblib")
    model, train = _key_configs(experiment, seed)
    return joblib.hash((model, train, version or code_version(), traces))


# --- one run ------------------------------------------------------------------------------------


def train_run(model: dict[str, Any], train: dict[str, Any], version: str, traces: bool = False) -> dict[str, Any]:
    """Train one run from plain config dicts and return everything the tables need, as plain data.

    ``version`` is not read: it is here so that the cache key changes with the code. This is the
    function ``joblib.Memory`` memoises, so its result must stay picklable and small. ``traces``:
    also record routing traces (``_TraceRecorder``) under ``"traces"``.
    """
    from workbench.train.trainer import Trainer, TrainingDiverged

    model_cfg = ModelConfig.from_dict(model)
    diverged = None
    with tempfile.TemporaryDirectory(prefix="workbench-run-") as tmp:
        cfg = TrainConfig.from_dict({**train, "run_dir": tmp, "progress": False,
                                     "checkpoint_every": train["steps"], "keep_checkpoints": 1})
        trainer = Trainer(model_cfg, cfg)
        recorder = _Recorder(trainer)
        tracer = _TraceRecorder(trainer) if traces else None
        t0 = time.perf_counter()
        try:
            trainer.fit(callback=recorder if tracer is None else _both(recorder, tracer))
        except TrainingDiverged as err:
            # a result like any other (the same config diverges again, so it is cached too); the
            # checkpoint the message names is in the temporary folder, gone in a moment
            diverged = " ".join(str(err).split()).split("; training stopped")[0]
        wall = time.perf_counter() - t0
    step_times = sorted(row["step_time_s"] for row in trainer.history[min(3, len(trainer.history) - 1):])
    return {
        "diverged": diverged,  # None, or what diverged and at which step
        "steps": recorder.scalar_rows,
        "load_fraction": recorder.load_fraction,
        "bias": recorder.bias,
        "evals": recorder.evals,
        "moe_layers": list(model_cfg.moe_layers),
        "num_params": model_cfg.num_params(),
        "num_active_params": model_cfg.num_active_params(),
        "step_time_s": step_times[len(step_times) // 2] if step_times else float("nan"),
        "tokens_per_s": trainer.throughput(),
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        **({"traces": tracer.result()} if tracer is not None else {}),
    }


def _both(*callbacks: Callable[[Any, dict[str, Any]], None]) -> Callable[[Any, dict[str, Any]], None]:
    def call(trainer: Any, row: dict[str, Any]) -> None:
        for callback in callbacks:
            callback(trainer, row)
    return call


class _Recorder:
    """``Trainer.fit`` callback: keeps each step's scalars, the per-layer expert loads and router
    biases, and at every validation the domain x expert counts, as plain Python data."""

    def __init__(self, trainer: Any):
        self.layers = list(trainer.model_cfg.moe_layers)
        self.scalar_rows: list[dict[str, Any]] = []
        self.load_fraction: dict[str, list[list[float]]] = {str(i): [] for i in self.layers}
        self.bias: dict[str, list[list[float]]] = {}
        self.evals: list[dict[str, Any]] = []

    def __call__(self, trainer: Any, row: dict[str, Any]) -> None:
        self.scalar_rows.append({k: v for k, v in row.items() if isinstance(v, int | float) and v is not None})
        for i in self.layers:
            loads = row.get(f"L{i}/load_fraction")
            if loads is not None:
                self.load_fraction[str(i)].append([round(x, 5) for x in loads])
        for i, layer in zip(self.layers, trainer.model.moe_layers(), strict=True):
            bias = getattr(layer.router, "bias", None)
            if bias is not None:
                self.bias.setdefault(str(i), []).append([round(x, 6) for x in bias.tolist()])
        if "val/loss" in row and trainer.last_eval is not None:
            ev = trainer.last_eval
            self.evals.append({"step": ev.step, "val_loss": ev.loss, "loss_per_domain": dict(ev.loss_per_domain),
                               "domains": list(ev.domains), "routing_matrix": ev.routing_matrix.tolist(),
                               **_capacity_eval(trainer)})


class _TraceRecorder:
    """``Trainer.fit`` callback for the specialization analyses: at every validation it routes a fixed
    probe set (the first ``PROBE_WINDOWS`` validation windows of every domain, so every domain is in
    it), for router saturation; at the last one it streams the whole validation set into
    ``RoutingCounts`` (``workbench.analysis.traces``), each window labelled with its domain.

    ``result()``: ``{"counts": RoutingCounts.to_dict(), "saturation": saturation_curve rows}``,
    plain data, the size of the counts (not of the tokens)."""

    PROBE_WINDOWS = 2

    def __init__(self, trainer: Any):
        val = trainer.data.val_batches()
        self.probe = torch.cat([batches[0].tokens[:self.PROBE_WINDOWS] for batches in val.values()])
        self.probes: list[tuple[int, torch.Tensor]] = []
        self.counts: dict[str, Any] | None = None

    def __call__(self, trainer: Any, row: dict[str, Any]) -> None:
        if "val/loss" not in row:
            return
        from workbench.analysis.traces import collect, probe_routing

        self.probes.append((trainer.step, probe_routing(trainer.model, self.probe)))
        if trainer.step >= trainer.cfg.steps:
            data = trainer.data
            batches = [b for bs in data.val_batches().values() for b in bs]
            with torch.no_grad(), trainer._autocast():
                self.counts = collect(trainer.model, batches, domains=list(data.domains)).to_dict()

    def result(self) -> dict[str, Any]:
        from workbench.analysis.specialization import saturation_curve

        if not self.probes or self.counts is None:
            return {}
        E = int(self.counts["num_experts"])
        return {"counts": self.counts, "saturation": saturation_curve(self.probes, self.counts["layers"], E)}


@torch.no_grad()
def _capacity_eval(trainer: Any) -> dict[str, float]:
    """For a model with the capacity dispatch, at a validation: the share of assignments that its
    dispatch drops on the validation batches, and the validation loss of the same weights behind
    the dropless dispatch. A validation batch holds one domain, so its routing is less even than a
    mixed training batch's and it can drop far more: the trainer's validation loss then measures
    serving with a capacity limit, ``dropless_val_loss`` what the weights learned. Empty otherwise.
    """
    moe = trainer.model_cfg.moe
    if moe is None or moe.dispatch != "capacity":
        return {}
    import torch.nn.functional as F

    from workbench.analysis.causality import dropless_copy

    with torch.random.fork_rng():  # building the copy draws an initialisation: keep the run's generator
        dropless = dropless_copy(trainer.model)
    model, was_training = trainer.model, trainer.model.training
    model.eval()
    dropless.eval()
    dropped = assignments = tokens = 0
    loss_sum = 0.0
    try:
        for batches in trainer.data.val_batches().values():
            for batch in batches:
                ids, targets = batch.tokens.to(trainer.device), batch.targets.to(trainer.device)
                with trainer._autocast():
                    for info in model(ids).routing:
                        dropped += int(info.stats.dropped_assignments)
                        assignments += info.router_output.expert_ids_TK.numel()
                    logits = dropless(ids).logits
                loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
                tokens += targets.numel()
    finally:
        model.train(was_training)
    return {"eval_dropped_fraction": dropped / max(1, assignments),
            "dropless_val_loss": loss_sum / tokens if tokens else float("nan")}


# --- many runs ----------------------------------------------------------------------------------


@dataclass
class Results:
    """The tidy tables of a sweep, and each run's per-step lists (``detail``)."""

    runs: Any  # pandas.DataFrame, one row per (experiment, seed)
    steps: Any  # one row per (experiment, seed, step)
    evals: Any  # one row per (experiment, seed, validation)
    details: dict[tuple[str, int], dict[str, Any]]  # (name, seed) -> train_run's record

    def detail(self, name: str, seed: int) -> dict[str, Any]:
        if (name, seed) not in self.details:
            known = sorted({n for n, _ in self.details})
            raise KeyError(f"no run named {name!r} with seed {seed}; names: {known}, seeds: "
                           f"{sorted({s for _, s in self.details})}")
        return self.details[(name, seed)]

    def routing_counts(self, name: str, seed: int) -> Any:
        """The run's ``RoutingCounts`` over the validation set after training (``run_experiments(...,
        traces=True)``)."""
        from workbench.analysis.traces import RoutingCounts

        traces = self.detail(name, seed).get("traces")
        if not traces:
            raise ValueError(f"run {name!r}, seed {seed} has no routing traces: train it with "
                             "run_experiments(..., traces=True)")
        return RoutingCounts.from_dict(traces["counts"])

    def saturation(self) -> Any:
        """Router saturation of every traced run: one row per (run, validation step, MoE layer) with
        the top-k overlap with the run's final routing of the probe set and its random baseline."""
        pd = _require("pandas")
        rows = [{"name": n, "seed": s, **row} for (n, s), d in self.details.items()
                for row in (d.get("traces") or {}).get("saturation", [])]
        return pd.DataFrame(rows)

    def summary(self, metrics: Sequence[str] = ("val_loss", "max_vio_global", "max_vio_batch"),
                by: str = "name") -> Any:
        """Mean and standard deviation over seeds of each metric, one row per experiment."""
        table = self.runs.groupby(by, sort=False)[list(metrics)].agg(["mean", "std", "count"])
        return table

    def save(self, folder: str | Path) -> Path:
        """Write runs.csv, evals.csv, steps.csv.gz and details.json.gz into ``folder``.

        The step table is the big one (a row per step), so it leaves out what ``load`` derives
        again (tokens seen and tokens/s, from each run's tokens per step) and the weighted losses
        (raw loss x the config's weight), and keeps 5 significant digits.
        """
        import gzip
        import json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.runs.to_csv(folder / "runs.csv", index=False)
        self.evals.to_csv(folder / "evals.csv", index=False)
        derived = ["tokens_seen", "tokens_per_s", *(c for c in self.steps.columns if c.startswith("weighted/"))]
        self.steps.drop(columns=derived, errors="ignore").to_csv(folder / "steps.csv.gz", index=False,
                                                                  float_format="%.5g")
        details = [{"name": n, "seed": s, **{k: v for k, v in d.items() if k != "steps"}}
                   for (n, s), d in self.details.items()]
        _atomic_write(folder / "details.json.gz", gzip.compress(json.dumps(details).encode()))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Results:
        import gzip
        import json

        pd = _require("pandas")
        folder = Path(folder)
        details = {(d.pop("name"), d.pop("seed")): d
                   for d in json.loads(gzip.decompress((folder / "details.json.gz").read_bytes()))}
        runs = pd.read_csv(folder / "runs.csv")
        steps = pd.read_csv(folder / "steps.csv.gz", low_memory=False)
        per_step = (runs["tokens"] / runs["steps"]).set_axis(pd.MultiIndex.from_frame(runs[["name", "seed"]]))
        tokens_per_step = per_step.reindex(pd.MultiIndex.from_frame(steps[["name", "seed"]])).to_numpy()
        steps["tokens_seen"] = steps["step"] * tokens_per_step
        steps["tokens_per_s"] = tokens_per_step / steps["step_time_s"]
        return cls(runs, steps, pd.read_csv(folder / "evals.csv"), details)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_experiments(experiments: Iterable[Experiment], seeds: Sequence[int] = (0,), *,
                    cache_dir: str | Path = "runs/cache", jobs: int = 1,
                    log: Callable[[str], None] | None = print, traces: bool = False) -> Results:
    """Train every experiment at every seed (its own ``seeds`` if it has them), or take the run
    from the cache, and tabulate the results.

    ``jobs``: runs trained at once, in worker processes that share the CPU threads equally
    (1: in this process, with its thread setting). ``log``: where progress lines go (None: nowhere).
    ``traces``: also record each run's routing traces over the validation set and router
    saturation over training (``Results.routing_counts``, ``Results.saturation``); a run cached
    without them trains again (saturation is measured at every validation during training, and the
    cache keeps no checkpoint), and the progress line says so.
    """
    joblib = _require("joblib")
    experiments = list(experiments)
    check(len(experiments) > 0, "experiments", "must list at least one Experiment", experiments)
    names = [e.name for e in experiments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    check(not dupes, "experiments", "need distinct names (they label the table rows)", dupes)
    _check_seeds(seeds)
    check(isinstance(jobs, int) and jobs >= 1, "jobs", "must be an integer >= 1", jobs)
    say = log or (lambda _: None)

    memory = joblib.Memory(str(Path(cache_dir)), verbose=0)
    cached_train = memory.cache(train_run)
    version = code_version()
    specs = [(e, s) for e in experiments for s in (e.seeds or seeds)]
    args = [(*_key_configs(e, s), version, traces) for e, s in specs]
    records: list[dict[str, Any] | None] = [None] * len(specs)
    todo = []
    for i, ((e, s), a) in enumerate(zip(specs, args, strict=True)):
        if cached_train.check_call_in_cache(*a):
            records[i] = _load_cached(cached_train, a, f"[{i + 1}/{len(specs)}] {e.name}, seed {s}", say)
        if records[i] is not None:
            records[i]["cached"] = True
            say(f"[{i + 1}/{len(specs)}] cached   {e.name}, seed {s}" + _diverged_note(records[i]))
        else:
            todo.append(i)
    if todo:
        say(f"training {len(todo)} of {len(specs)} runs, {min(jobs, len(todo))} at a time"
            + (_untraced_note(cached_train, [args[i] for i in todo]) if traces else ""))

    def finished(i: int, record: dict[str, Any]) -> None:
        record["cached"] = False
        records[i] = record
        e, s = specs[i]
        if record.get("diverged"):
            say(f"[{i + 1}/{len(specs)}] diverged {e.name}, seed {s}: {record['diverged']}; the sweep goes on")
            return
        last = record["evals"][-1] if record["evals"] else {}
        vio = _global_max_vio(last) if last else float("nan")
        say(f"[{i + 1}/{len(specs)}] done     {e.name}, seed {s}: val loss {_fmt(last.get('val_loss'))}, "
            f"global MaxVio {_fmt(vio)}, {record['wall_s']:.0f} s")

    if jobs == 1 or len(todo) == 1:
        for i in todo:
            say(f"[{i + 1}/{len(specs)}] training {specs[i][0].name}, seed {specs[i][1]}")
            finished(i, cached_train(*args[i]))
    elif todo:
        _train_in_workers(cached_train, args, todo, specs, min(jobs, len(todo)), say, finished)
    return _tabulate(specs, records)


def _untraced_note(cached_train: Any, todo_args: list[tuple]) -> str:
    """Why runs cached without traces train again for ``traces=True``: the saturation curve is
    routed at every validation during training, and the cache keeps no checkpoint to start from."""
    untraced = sum(cached_train.check_call_in_cache(*a[:-1], False) for a in todo_args)
    if not untraced:
        return ""
    return (f" ({untraced} of them {'is' if untraced == 1 else 'are'} cached without routing traces, and "
            "traces=True records them during training: router saturation at every validation)")


def _load_cached(cached_train: Any, args: tuple, what: str, say: Callable[[str], None]) -> dict[str, Any] | None:
    """A run's record from the cache, or None (the entry removed, one line said) when it cannot be
    read: joblib itself would print the unpickling traceback and retrain without saying why."""
    shelved = cached_train.call_and_shelve(*args)  # in the cache: a reference, nothing is run
    try:
        record = shelved.get()
        check(isinstance(record, dict) and "steps" in record, "record", "must be a run's record", type(record))
        return record
    except Exception as err:  # any unpickling error: a truncated file, foreign bytes, an old format
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        say(f"{what}: its cache entry cannot be read ({type(err).__name__}: {reason}); training it again")
        with contextlib.suppress(OSError):
            shelved.clear()
        return None


def _diverged_note(record: dict[str, Any]) -> str:
    return f" (diverged: {record['diverged']})" if record.get("diverged") else ""


def _train_in_workers(cached_train, args, todo, specs, jobs: int, say, finished) -> None:
    """At most ``jobs`` runs in flight, so each run's "training" line is printed as it starts."""
    from joblib.externals.loky import get_reusable_executor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    # joblib's loky workers start fresh interpreters (a forked child of a process that has run
    # OpenMP can deadlock) without re-running the caller's script, so no __main__ guard is needed.
    pool = get_reusable_executor(max_workers=jobs, initializer=_worker_init, initargs=(threads,),
                                 reuse=False)
    queue = list(todo)
    try:
        running: dict[cf.Future, int] = {}
        while queue or running:
            while queue and len(running) < jobs:
                i = queue.pop(0)
                say(f"[{i + 1}/{len(specs)}] training {specs[i][0].name}, seed {specs[i][1]}")
                running[pool.submit(cached_train, *args[i])] = i
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                finished(running.pop(fut), fut.result())
    finally:
        pool.shutdown(wait=True, kill_workers=True)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("WANDB_MODE", "disabled")


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


# --- tables ---------------------------------------------------------------------------------------


def _layer_loads(ev: dict[str, Any]) -> list[list[float]]:
    """Per MoE layer, the validation set's assignments per expert (summed over domains)."""
    return [[sum(col) for col in zip(*layer, strict=True)] for layer in ev["routing_matrix"]]


def _global_max_vio(ev: dict[str, Any]) -> float:
    """MaxVio over the whole validation set (Wang et al. 2024, "MaxVio_global"), mean over layers."""
    values = [load_metrics(torch.tensor(loads))["max_vio"] for loads in _layer_loads(ev)]
    return sum(values) / len(values) if values else float("nan")


def _eval_row(ev: dict[str, Any], moe_layers: Sequence[int]) -> dict[str, Any]:
    from workbench.analysis.routing import domain_expert_mutual_information

    row: dict[str, Any] = {"step": ev["step"], "val_loss": ev["val_loss"]}
    row.update({f"val/{d}": v for d, v in ev["loss_per_domain"].items()})
    vios, mis = [], []
    for i, (layer_matrix, loads) in enumerate(zip(ev["routing_matrix"], _layer_loads(ev), strict=True)):
        m = load_metrics(torch.tensor(loads))
        mi = domain_expert_mutual_information(torch.tensor(layer_matrix))
        layer = moe_layers[i]
        row.update({f"L{layer}/max_vio_global": m["max_vio"], f"L{layer}/cv_global": m["cv"],
                    f"L{layer}/unused_experts_global": m["unused_experts"], f"L{layer}/domain_mi": mi})
        vios.append(m["max_vio"])
        mis.append(mi)
    for extra in ("eval_dropped_fraction", "dropless_val_loss"):  # capacity dispatch only
        if extra in ev:
            row[extra] = ev[extra]
    row["max_vio_global"] = sum(vios) / len(vios) if vios else float("nan")
    row["domain_mi"] = sum(mis) / len(mis) if mis else float("nan")
    return row


def _tail_mean(rows: Sequence[dict[str, Any]], key: str, fraction: float = 0.1) -> float:
    """Mean of ``key`` over the last ``fraction`` of the steps (at least one)."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return float("nan")
    tail = values[-max(1, math.ceil(len(values) * fraction)):]
    return sum(tail) / len(tail)


def _tabulate(specs: Sequence[tuple[Experiment, int]], records: Sequence[dict[str, Any]]) -> Results:
    pd = _require("pandas")
    run_rows, step_rows, eval_rows, details = [], [], [], {}
    for (e, seed), rec in zip(specs, records, strict=True):
        ident = {"name": e.name, "seed": seed, **e.tags}
        details[(e.name, seed)] = rec
        layer_means = ("cv", "entropy", "unused_experts", "dropped_fraction")
        for row in rec["steps"]:
            means = {}
            for metric in layer_means:  # the per-layer columns, averaged like max_vio already is
                values = [row[f"L{i}/{metric}"] for i in rec["moe_layers"] if f"L{i}/{metric}" in row]
                if values:
                    means[metric] = sum(values) / len(values)
            step_rows.append({**ident, **row, **means})
        evs = [_eval_row(ev, rec["moe_layers"]) for ev in rec["evals"]]
        eval_rows.extend({**ident, **ev} for ev in evs)
        final = evs[-1] if evs else {}
        steps = rec["steps"]
        layers = rec["moe_layers"]
        run_rows.append({
            **ident,
            "steps": steps[-1]["step"] if steps else 0,
            "tokens": steps[-1]["tokens_seen"] if steps else 0,
            "val_loss": final.get("val_loss"),
            **{k: v for k, v in final.items() if k.startswith("val/")},
            "train_loss": _tail_mean(steps, "lm_loss"),
            "max_vio_global": final.get("max_vio_global", float("nan")),
            "max_vio_batch": _tail_mean(steps, "max_vio"),  # training batches, last 10% of steps
            "cv_batch": _mean([_tail_mean(steps, f"L{i}/cv") for i in layers]),
            "entropy_batch": _mean([_tail_mean(steps, f"L{i}/entropy") for i in layers]),
            "unused_experts_global": _mean([final.get(f"L{i}/unused_experts_global", float("nan")) for i in layers]),
            "dropped_fraction": _mean([_tail_mean(steps, f"L{i}/dropped_fraction") for i in layers]),
            # capacity dispatch: drops on the validation batches, and the loss without them
            "eval_dropped_fraction": final.get("eval_dropped_fraction", float("nan")),
            "dropless_val_loss": final.get("dropless_val_loss", float("nan")),
            "domain_mi": final.get("domain_mi", float("nan")),
            "step_time_s": rec["step_time_s"],
            "tokens_per_s": rec["tokens_per_s"],
            "wall_s": rec["wall_s"],
            "diverged": rec.get("diverged"),  # None, or what diverged at which step
            "cached": rec.get("cached", False),
        })
    return Results(pd.DataFrame(run_rows), pd.DataFrame(step_rows), pd.DataFrame(eval_rows), details)


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def default_jobs() -> int:
    """One run per CPU core, at most 8 (small models scale better across runs than within one)."""
    return max(1, min(8, os.cpu_count() or 1)) if sys.platform != "win32" else 1


# --- sweep files (``workbench sweep FILE.yaml``) ---------------------------------------------------

SWEEP_KEYS = ("preset", "seeds", "model", "moe", "train", "runs", "cache", "out", "jobs")
RUN_KEYS = ("name", "model", "moe", "train", "dense", "seeds", "tags")


@dataclass
class Sweep:
    """A sweep file, read and checked: what to run and where results go."""

    experiments: list[Experiment]
    seeds: list[int]
    cache_dir: Path
    out_dir: Path
    jobs: int


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file (YAML). Every key is checked; a bad one raises ``ValueError`` naming the
    file and the key (each config value against its field's type: ``dense: "no"`` is refused, not
    taken as true).

        preset: tiny                  # model preset (default tiny)
        seeds: [0, 1, 2]              # default [0]
        model: {n_layers: 4}          # ModelConfig fields for every run
        moe: {num_experts: 8}         # MoEConfig fields for every run
        train: {steps: 300}           # TrainConfig fields for every run
        runs:                         # one entry per experiment, each with its own name
          - name: aux 1e-2
            moe: {aux_loss_weight: 0.01}
          - name: dense twin
            dense: true               # the dense model with the same active parameters
        cache: runs/cache             # default runs/cache
        out: runs/sweeps/NAME         # default runs/sweeps/<file name without suffix>
        jobs: 2                       # default: one run per CPU core
    """
    path = Path(path)
    try:
        return _load_sweep(path)
    except ValueError as err:
        message = " ".join(str(err).split())
        raise ValueError(message if message.startswith("sweep file") else f"sweep file {str(path)!r}: {message}") \
            from None


def _load_sweep(path: Path) -> Sweep:
    from workbench.config import dense_baseline, preset

    yaml = _require("yaml")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"sweep file {str(path)!r} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"sweep file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start}): give a YAML file") from None
    except yaml.YAMLError as err:
        raise ValueError(f"sweep file {str(path)!r} is not valid YAML: {' '.join(str(err).split())}") from None
    check(isinstance(spec, dict), "sweep file", "must be a YAML mapping with a 'runs' list", type(spec).__name__)
    _check_keys("sweep file", spec, SWEEP_KEYS)
    check(isinstance(spec.get("runs"), list) and spec["runs"], "runs", "must be a non-empty list of runs",
          spec.get("runs"))
    seeds = spec.get("seeds", [0])
    _check_seeds(seeds)
    base_sections = {k: spec.get(k) or {} for k in ("model", "moe", "train")}
    for key, section in base_sections.items():
        check(isinstance(section, dict), key, "must be a mapping of config fields", section)
    preset_name = spec.get("preset", "tiny")
    for key in ("cache", "out"):
        if key in spec:
            check(isinstance(spec[key], str) and spec[key].strip() != "", key, "must be a folder path", spec[key])

    experiments = []
    for i, run in enumerate(spec["runs"]):
        where = f"runs[{i}]"
        check(isinstance(run, dict), where, "must be a mapping with at least a 'name'", run)
        _check_keys(where, run, RUN_KEYS)
        where = f"{where} ({run.get('name', 'unnamed')})"
        for key in ("model", "moe", "train"):
            check(isinstance(run.get(key) or {}, dict), f"{where}.{key}", "must be a mapping of config fields",
                  run.get(key))
        check(isinstance(run.get("dense", False), bool), f"{where}.dense", "must be true or false",
              run.get("dense"))
        check(isinstance(run.get("name", ""), str | int | float) and not isinstance(run.get("name"), bool),
              f"{where}.name", "must be a string", run.get("name"))
        sections = {k: {**base_sections[k], **(run.get(k) or {})} for k in ("model", "moe", "train")}
        for key, cls in (("model", ModelConfig), ("moe", MoEConfig), ("train", TrainConfig)):
            allowed = [f.name for f in fields(cls) if f.name != "moe"]
            _check_keys(f"{where} {key}", sections[key], allowed)
            _check_types(f"{where} {key}", cls, sections[key])
        try:
            model = preset(preset_name, **sections["moe"])
            model = ModelConfig.from_dict({**model.to_dict(), **sections["model"], "moe": model.moe})
            if run.get("dense", False):
                model = dense_baseline(model)
            run_seeds = run.get("seeds")
            if run_seeds is not None:
                _check_seeds(run_seeds)
            experiments.append(Experiment(name=str(run.get("name", "")), model=model,
                                          train=TrainConfig(**sections["train"]), tags=run.get("tags") or {},
                                          seeds=tuple(run_seeds) if run_seeds is not None else None))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {' '.join(str(err).split())}") from None
    names = [e.name for e in experiments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    check(not dupes, "runs", "need distinct names (they label the table rows)", dupes)
    jobs = spec.get("jobs", default_jobs())
    check(isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1, "jobs", "must be an integer >= 1", jobs)
    return Sweep(experiments, list(seeds), Path(spec.get("cache", "runs/cache")),
                 Path(spec.get("out", Path("runs/sweeps") / path.stem)), jobs)


def check_folder(field_name: str, path: str | Path) -> None:
    """``path`` is a folder or can be made one: neither it nor a folder above it is a file. Checked
    before a sweep trains, so a results folder that cannot be written does not cost the sweep."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            where = "it" if existing == path else repr(str(existing))
            check(existing.is_dir(), field_name, f"must be a folder, and {where} is a file", str(path))
            return


def _check_keys(where: str, mapping: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    check(not unknown, where, f"has unknown keys {unknown}; allowed keys are {', '.join(allowed)}", unknown)


def _type_words(kind: Any) -> tuple[tuple[type, ...], str] | None:
    """The Python types a YAML value of the field type ``kind`` may have, and how to say it; None: any."""
    import types
    import typing

    if kind is bool:
        return (bool,), "true or false"
    if kind is int:
        return (int,), "an integer"
    if kind is float:  # YAML reads 1 as an int
        return (int, float), "a number"
    if kind is str:
        return (str,), "a string"
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(inner) == 1 and (words := _type_words(inner[0])) is not None:
            return (*words[0], type(None)), f"{words[1]} or null"
    return None


def _check_types(where: str, cls: type, values: Mapping[str, Any]) -> None:
    """Each value must have its dataclass field's type: a bool is not taken for an int or a number,
    nor a string for a bool (the configs compare values, and "no" is true)."""
    import typing

    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        expected = _type_words(hints[name])
        if expected is None:
            continue
        kinds, words = expected
        ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
        check(ok, f"{where}.{name}", f"must be {words} ({cls.__name__}.{name})", value)


def summary_table(results: Results | Any) -> str:
    """One line per experiment: seeds, validation loss and global MaxVio (mean ± std), tokens/s.
    ``results``: a ``Results``, or its ``runs`` table (runs.csv, read back)."""
    runs = getattr(results, "runs", results)
    lines = [f"{'experiment':<32} {'seeds':>5}  {'val loss':>17}  {'global MaxVio':>15}  {'tokens/s':>9}"]
    def mean_std(values: Any, digits: int) -> str:
        mean, std = values.mean(), values.std()
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std == std else "")

    for name, rows in runs.groupby("name", sort=False):
        lines.append(f"{name:<32} {len(rows):>5}  {mean_std(rows['val_loss'], 4):>17}  "
                     f"{mean_std(rows['max_vio_global'], 3):>15}  {rows['tokens_per_s'].median():>9,.0f}")
    return "\n".join(lines)
