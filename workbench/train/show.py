"""What a run did, read from its directory without changing anything: ``workbench show RUN_DIR``.

Works on any state a run can be left in: finished, diverged (``run.json`` keeps the message),
interrupted (Ctrl-C, or killed: ``run.json`` still says running but its process is gone), and
runs from before ``run.json`` existed (then the newest checkpoint's header gives the config).
Only the headers of checkpoints are read, but for the newest one that loads: it is verified
(its checksum, shapes and configs) as a resume would, so a corrupt file is never named the last.

A value a run cannot give (no validation window, no step timed) is None here, ``null`` in
``--json`` output and ``n/a`` with its reason in the text.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from workbench.train.checkpoint import FORMAT, CheckpointError, list_checkpoints, load_checkpoint
from workbench.train.rundir import RUN_FILE, RUN_FORMAT, check_run_info, json_safe

TAIL = 10  # balance is the mean over the last TAIL logged steps
SKIP = 3  # throughput leaves out the first SKIP logged steps (warm-up)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of ``metrics.jsonl``: a JSON object with an integer step. Other lines (one cut short
    by a kill, one edited by hand) are left out, with one warning naming them."""
    if not path.is_file():
        return []
    rows, bad = [], []
    # bytes that are not UTF-8 (a binary file) make their lines unreadable rows, not a codec error
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and type(row.get("step", 0)) is int:
            rows.append(row)
        elif line.strip():
            bad.append(number)
    if bad:
        listed = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"{path}: line{'s' if len(bad) > 1 else ''} {listed} {'are' if len(bad) > 1 else 'is'} "
                      "not a metrics row (a JSON object with an integer step); left out", stacklevel=2)
    return rows


def _checkpoint_header(path: Path) -> dict[str, Any] | None:
    """The JSON metadata of a checkpoint (step and configs), without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            return None
        return {"step": int(meta["step"]), "model_config": json.loads(meta["model_config"]),
                "train_config": json.loads(meta["train_config"])}
    except Exception:  # truncated or foreign: the next older one is tried
        return None


def _process_alive(run: dict[str, Any]) -> bool | None:
    """Whether the process that wrote ``run.json`` still runs; None when that cannot be told."""
    pid, host = run.get("pid"), run.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _non_defaults(values: dict[str, Any], cls: type, skip: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        defaults = asdict(cls()) if defaults is None else defaults
    except Exception:
        return {}
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names and k not in skip and defaults.get(k) != v}


def _model_non_defaults(model_cfg: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The model settings that differ from the preset the run was built from, and that preset's name.

    ``workbench train`` starts from a preset (tiny unless --preset says otherwise), so a run's
    defaults are that preset's, not the bare ``ModelConfig()``'s; runs do not record the preset, so
    it is the one the run differs from least (ties: tiny, the CLI's default).
    """
    from workbench.config import PRESETS, ModelConfig, MoEConfig, preset

    if not isinstance(model_cfg, dict):
        return None, {}
    moe = model_cfg.get("moe")
    best: tuple[str | None, dict[str, Any]] = (None, {})
    for name in PRESETS:
        try:
            base = asdict(preset(name))
        except Exception:
            continue
        found = _non_defaults(model_cfg, ModelConfig, skip=("moe",), defaults=base)
        if isinstance(moe, dict):
            found.update({f"moe.{k}": v for k, v in _non_defaults(moe, MoEConfig, defaults=base["moe"]).items()})
        elif base["moe"] is not None:
            found["moe"] = None  # the dense baseline (--dense)
        if best[0] is None or len(found) < len(best[1]):
            best = (name, found)
    return best


def is_sweep_folder(folder: str | Path) -> bool:
    """A sweep's results folder (``workbench sweep --out``, ``Results.save``), not a run directory."""
    folder = Path(folder)
    return (folder / "runs.csv").is_file() and (folder / "details.json.gz").is_file() and not (
        folder / RUN_FILE).exists()


def sweep_runs(folder: str | Path) -> Any:
    """A sweep results folder's table of runs (runs.csv; pandas), one row per run."""
    from workbench.experiments import _require

    return _require("pandas").read_csv(Path(folder) / "runs.csv")


def describe_sweep(folder: str | Path) -> str:
    """What ``workbench show`` prints for a sweep's results folder: its runs train in temporary folders
    (the cache keeps their tables, not checkpoints), so the folder's tables are what there is to show."""
    from workbench.experiments import summary_table

    folder = Path(folder)
    runs = sweep_runs(folder)
    diverged = runs[runs["diverged"].notna()] if "diverged" in runs else runs.iloc[:0]
    lines = [f"sweep results in {folder}: {len(runs)} runs of {runs['name'].nunique()} experiments"
             + (f", {len(diverged)} diverged" if len(diverged) else ""),
             summary_table(runs),
             "its runs trained in temporary folders (the sweep keeps their tables, not run directories): "
             f"workbench.experiments.Results.load({str(folder)!r}) has every step, evaluation and routing count"]
    return "\n".join(lines)


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    """The facts ``workbench show`` prints, as a JSON-ready dict; ``ValueError`` if ``run_dir`` is
    not a run directory."""
    from workbench.config import ModelConfig
    from workbench.train.config import TrainConfig

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is invalid: " +
                         ("it is a file, not a run folder" if run_dir.exists() else "no such folder"))
    run = _read_json(run_dir / RUN_FILE)
    run = run if isinstance(run, dict) else None
    if run is not None and run.get("format") == RUN_FORMAT:  # hand-edited: one line naming the field
        check_run_info(run_dir, run)
    ckpts = list_checkpoints(run_dir)
    header = None
    for _, path in reversed(ckpts):
        if (header := _checkpoint_header(path)) is not None:
            break
    rows = _read_metrics(run_dir / "metrics.jsonl")
    summary = _read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    if run is None and header is None and not rows:
        if ckpts:  # checkpoint files, none of them readable: not "no checkpoint"
            names = ", ".join(p.name for _, p in ckpts)
            raise ValueError(f"run_dir={str(run_dir)!r} holds no readable checkpoint: {names} "
                             f"{'is' if len(ckpts) == 1 else 'are'} unreadable (truncated, or not a workbench "
                             f"checkpoint), and there is no {RUN_FILE} or metrics.jsonl")
        raise ValueError(f"run_dir={str(run_dir)!r} is invalid: it holds no {RUN_FILE}, checkpoint or "
                         "metrics.jsonl (is it the folder given to workbench train --run-dir?)")

    source = run or header or {}
    model_cfg, train_cfg = source.get("model_config") or {}, source.get("train_config") or {}
    total = train_cfg.get("steps")
    # The newest checkpoint is verified (checksum, shapes, configs) as a resume would: the one named
    # last is the one a resume starts from; the newer ones it skips are listed with the reason.
    unusable: dict[str, str] = {}
    last_ckpt = None
    for ckpt_step, path in reversed(ckpts):
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            unusable[path.name] = str(err)
            continue
        last_ckpt = (ckpt_step, path.name)
        break
    logged = rows[-1].get("step") if rows else None
    info: dict[str, Any] = {"run_dir": str(run_dir), "steps": total, "last_logged_step": logged,
                            "last_checkpoint": None if last_ckpt is None else
                            {"step": last_ckpt[0], "file": last_ckpt[1]},
                            "checkpoints": [p.name for _, p in ckpts], "unusable_checkpoints": unusable}

    # how the run ended
    step = max([s for s in (logged, last_ckpt[0] if last_ckpt else None) if s is not None], default=0)
    status, message = (run.get("status"), run.get("message")) if run else (None, None)
    if status == "running":
        alive = _process_alive(run)
        if alive is False:
            status, message = "interrupted", "killed: run.json says running, but its process is gone"
        elif alive is None:
            status, message = "running or killed", "run.json says running; its process cannot be checked from here"
    if status is None:  # no run.json: judge by the checkpoints
        finished = total is not None and last_ckpt is not None and last_ckpt[0] >= total
        status = "finished" if finished else "interrupted"
    info["status"], info["message"] = status, message
    info["step"] = step

    # config
    info["model_config"], info["train_config"] = model_cfg, train_cfg
    try:
        cfg = ModelConfig.from_dict(model_cfg)
        info["params"], info["active_params"] = cfg.num_params(), cfg.num_active_params()
    except Exception:  # a config this version of the code no longer accepts
        info["params"] = info["active_params"] = None
    # the defaults `workbench train --help` shows: a preset's model (tiny's unless another fits the run
    # better) and TrainConfig's training settings
    info["defaults_preset"], model_non_default = _model_non_defaults(model_cfg)
    info["non_default"] = {
        **model_non_default,
        **_non_defaults(train_cfg, TrainConfig, skip=("run_dir", "progress")),
    }

    # validation: the last evaluated row
    evals = [r for r in rows if "val/loss" in r]
    if evals:
        ev = evals[-1]
        missing = ev.get("val_missing") or {}
        per_domain = {k[len("val/"):]: v for k, v in ev.items() if k.startswith("val/") and k != "val/loss"}
        per_domain.update({d: None for d in missing})
        info["validation"] = {"step": ev["step"], "loss": ev.get("val/loss"), "per_domain": per_domain,
                              "missing": missing}
    else:
        info["validation"] = {"step": None, "loss": None, "per_domain": {},
                              "missing": {"all": "no validation ran before the run stopped" if rows
                                          else "no step was logged"}}
    tail = rows[-TAIL:]
    info["train_loss"] = statistics.fmean(r["lm_loss"] for r in tail) if tail and all(
        isinstance(r.get("lm_loss"), (int, float)) for r in tail) else None

    # balance
    layers = sorted({k.split("/")[0] for r in tail for k in r if k.startswith("L") and k.endswith("/max_vio")},
                    key=lambda name: int(name[1:]) if name[1:].isdigit() else 0)
    balance: dict[str, Any] = {}
    for layer in layers:
        vio = [r[f"{layer}/max_vio"] for r in tail if isinstance(r.get(f"{layer}/max_vio"), (int, float))]
        dropped = [r[f"{layer}/dropped_fraction"] for r in tail
                   if isinstance(r.get(f"{layer}/dropped_fraction"), (int, float))]
        balance[layer] = {"max_vio": statistics.fmean(vio) if vio else None,
                          "dropped_fraction": statistics.fmean(dropped) if dropped else None}
    info["balance"] = balance
    info["balance_steps"] = len(tail)

    # throughput
    rates = [r["tokens_per_s"] for r in rows[SKIP:] or rows if isinstance(r.get("tokens_per_s"), (int, float))]
    info["tokens_per_s"] = statistics.median(rates) if rates else None
    info["mfu"] = summary.get("mfu") if summary else None
    info["tokens_seen"] = rows[-1].get("tokens_seen") if rows else None
    info["wandb_run_id"] = run.get("wandb_run_id") if run else None
    # fine-tuning: where the starting weights came from, and what trained (run.json's records)
    info["init_from"] = run.get("init_from") if run else None
    info["trainable"] = run.get("trainable") if run else None
    return json_safe(info)


def _fmt(value: Any, spec: str = ".3f", why: str | None = None) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return f"n/a ({why})" if why else "n/a"


def format_run(info: dict[str, Any]) -> str:
    """``describe_run``'s facts as the text ``workbench show`` prints."""
    m, t = info["model_config"], info["train_config"]
    moe = m.get("moe")
    lines = [f"run: {info['run_dir']}"]
    status = info["status"] + (f": {info['message']}" if info.get("message") else "")
    lines.append(f"status: {status}")
    last = info["last_checkpoint"]
    lines.append(f"steps: {info['step']} of {_fmt(info['steps'], 'd')}; last checkpoint: "
                 + (f"{last['file']} (step {last['step']})" if last else "none")
                 + (f"; {info['tokens_seen']:,} tokens seen" if isinstance(info.get("tokens_seen"), int) else ""))
    for name, why in (info.get("unusable_checkpoints") or {}).items():
        lines.append(f"  {name} is skipped on resume: {why}")
    shape = (f"d_model {m.get('d_model')}, {m.get('n_layers')} layers, seq_len {m.get('seq_len')}, "
             f"vocab {m.get('vocab_size')}")
    if isinstance(moe, dict):
        shape += (f"; MoE: {moe.get('num_experts')} experts x hidden {moe.get('expert_hidden')}, "
                  f"top-{moe.get('top_k')}, router {moe.get('router')}, dispatch {moe.get('dispatch')}")
    else:
        shape += "; dense (no MoE layer)"
    if info.get("params") is not None:
        shape += f"; {info['params']:,} parameters ({info['active_params']:,} active per token)"
    lines.append(f"model: {shape}")
    data = t.get("data") or f"built-in corpus ({t.get('max_bytes_per_domain')} bytes per domain)"
    lines.append(f"training: batch {t.get('batch_size')} x {t.get('grad_accum')} accumulation, lr {t.get('lr')}, "
                 f"seed {t.get('seed')}, device {t.get('device')}; data: {data}")
    init = info.get("init_from")
    if isinstance(init, dict):
        lines.append(f"started from: {init.get('path')} (step {init.get('step')}, weights only; new optimizer "
                     "and schedule)")
    trained = info.get("trainable")
    if isinstance(trained, dict) and trained.get("group", "all") != "all":
        line = f"trainable: {trained.get('group')}"
        if isinstance(trained.get("parameters"), int) and isinstance(trained.get("of"), int):
            line += f", {trained['parameters']:,} of {trained['of']:,} parameters"
        esft = trained.get("esft")
        if isinstance(esft, dict) and isinstance(esft.get("experts"), list):
            line += "; ESFT experts per MoE layer: " + " | ".join(str(e) for e in esft["experts"])
        lines.append(line)
    nd = info.get("non_default") or {}
    if nd:
        against = f" (the {info['defaults_preset']} preset's)" if info.get("defaults_preset") else ""
        lines.append(f"settings not at their defaults{against}: " + ", ".join(f"{k}={v}" for k, v in nd.items()))

    v = info["validation"]
    if v["step"] is None:
        lines.append(f"validation loss: n/a ({v['missing'].get('all', 'none recorded')})")
    else:
        parts = [f"{d} {_fmt(x)}" for d, x in v["per_domain"].items()]
        lines.append(f"validation loss at step {v['step']} (nats/byte): " + " | ".join(parts)
                     + f" | all {_fmt(v['loss'])}")
        for d, why in v["missing"].items():
            lines.append(f"  {d}: n/a, {why}")
    lines.append(f"train loss (mean of the last {info['balance_steps']} logged steps): "
                 f"{_fmt(info['train_loss'], why='no step logged')}")
    if info["balance"]:
        parts = []
        for layer, b in info["balance"].items():
            part = f"{layer} MaxVio {_fmt(b['max_vio'], '.2f')}"
            if b["dropped_fraction"] is not None:
                part += f", dropped {100 * b['dropped_fraction']:.1f}%"
            parts.append(part)
        lines.append(f"balance (mean of the last {info['balance_steps']} logged steps): " + "; ".join(parts))
    elif not isinstance(moe, dict):
        lines.append("balance: n/a (dense model)")
    else:
        lines.append("balance: n/a (no step logged)")
    mfu = f"; MFU {100 * info['mfu']:.1f}% (summary.json)" if isinstance(info.get("mfu"), float) else ""
    if info["tokens_per_s"] is None:
        lines.append("throughput: n/a (no step logged)")
    else:
        lines.append(f"throughput: {info['tokens_per_s']:,.0f} tokens/s (median of the logged steps){mfu}")
    if info.get("wandb_run_id"):
        lines.append(f"wandb run: {info['wandb_run_id']}")
    return "\n".join(lines)
