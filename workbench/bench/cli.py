"""The throughput lab's commands: ``workbench bench throughput | model | devices``.

``workbench.cli`` registers them (``add_parsers``) and runs them (``RUNNERS``); every bad value is one
line on stderr naming it, exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from workbench.cli import fail, write_json
from workbench.validation import check

_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def _names(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def add_parsers(which: argparse._SubParsersAction) -> None:
    """Add ``throughput``, ``model`` and ``devices`` under ``workbench bench``."""
    from workbench.bench.harness import SWEEPS, LayerCase

    base = LayerCase()
    tp = which.add_parser(
        "throughput", help="MoE layer and model throughput on this machine's backends, with the analytic model",
        description="Time an MoE layer (each dispatch, learned and forced-uniform routing, forward and forward + "
                    "backward), sweeps over tokens per step, expert granularity at fixed active FLOPs, top-k and "
                    "capacity factor, and whole presets, on PyTorch (CPU / CUDA / Ascend) and MindSpore where "
                    "present; each with the analytic model's prediction and its error. Writes JSON (environment, "
                    "git commit, date) and a figure.", formatter_class=_FORMAT)
    tp.add_argument("--tokens", type=int, default=base.tokens, help="tokens of the base layer case (T)")
    tp.add_argument("--d-model", type=int, default=base.d_model, help="model width (D)")
    tp.add_argument("--num-experts", type=int, default=base.num_experts, help="experts (E)")
    tp.add_argument("--top-k", type=int, default=base.top_k, help="experts per token (K)")
    tp.add_argument("--expert-hidden", type=int, default=base.expert_hidden, help="expert hidden size (H)")
    tp.add_argument("--dispatches", type=_names, default="sorted,capacity,loop", help="dispatches to time")
    tp.add_argument("--sweeps", type=_names, default=",".join(SWEEPS), help="sweeps to run (empty: none)")
    tp.add_argument("--presets", type=_names, default="tiny,small", help="whole models to time")
    tp.add_argument("--batch-size", type=int, default=8, help="sequences per step of the whole models")
    tp.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (median)")
    tp.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    tp.add_argument("--device", default="cpu", help="cpu, cuda[:N] or npu[:N]")
    tp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    tp.add_argument("--no-mindspore", action="store_true", help="skip the MindSpore measurements")
    tp.add_argument("--mindspore-mode", default="graph", choices=["pynative", "graph"], help="MindSpore mode")
    tp.add_argument("--smoke", action="store_true", help="tiny sizes and 2 repeats: checks the pipeline in seconds")
    tp.add_argument("--json", type=Path, default=None, help="write the results here")
    tp.add_argument("--figure", type=Path, default=None, help="write the figure here (default: the JSON path, .png)")
    tp.add_argument("--no-allocator-tuning", action="store_true", help="leave glibc's allocator as it is")

    md = which.add_parser(
        "model", help="the analytic model: real-model shapes on the device table, and its error on published runs",
        description="Predict training tokens/s, TFLOP/s and MFU per device for real-model shapes on the devices of "
                    "the device table, at the low / table / high ends of each contested figure's band; with "
                    "--published, the model against every published figure it is checked on.",
        formatter_class=_FORMAT)
    md.add_argument("--shapes", type=_names, default="mixtral-8x7b,deepseek-v3,qwen3-30b-a3b,qwen3-235b-a22b,"
                    "telechat3-105b-a4.7b,gpt-oss-120b", help="shapes (workbench.bench.perfmodel.SHAPES)")
    md.add_argument("--devices", type=_names, default="H100,H200,Ascend910B2", help="device keys of the table")
    md.add_argument("--ep", type=int, default=8, help="expert-parallel degree")
    md.add_argument("--tokens", type=int, default=None, help="tokens per device per micro-batch (default: one "
                    "sequence of the shape)")
    md.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8", "fp32"], help="GEMM dtype")
    md.add_argument("--overlap", type=float, default=0.0, help="fraction of the all-to-all hidden behind compute")
    md.add_argument("--devices-file", type=Path, default=None, help="an edited copy of devices.yaml")
    md.add_argument("--published", action="store_true", help="also print the error against published figures")
    md.add_argument("--json", type=Path, default=None, help="write the predictions here")
    md.add_argument("--figure", type=Path, default=None, help="write a bar chart of tokens/s here")

    dv = which.add_parser("devices", help="the device table with every figure's source",
                          description="Print the device table (workbench/bench/devices.yaml, or --file) with "
                                      "each figure's band, status and source.", formatter_class=_FORMAT)
    dv.add_argument("--file", type=Path, default=None, help="an edited copy of devices.yaml")


def run_throughput_command(args: argparse.Namespace) -> int:
    from workbench.bench import harness

    prog = "workbench bench throughput"
    try:
        base = harness.LayerCase(tokens=args.tokens, d_model=args.d_model, num_experts=args.num_experts,
                                 top_k=args.top_k, expert_hidden=args.expert_hidden)
        from workbench.config import preset

        for name in args.presets:
            preset(name)
        from workbench.train.trainer import resolve_device

        device = str(resolve_device(args.device))
        fields = dict(dispatches=args.dispatches, sweeps=args.sweeps, presets=args.presets,
                      model_batch_size=args.batch_size, mindspore=not args.no_mindspore,
                      mindspore_mode=args.mindspore_mode, device=device, dtype=args.dtype, repeats=args.repeats,
                      warmup=args.warmup)
        if args.smoke:
            cfg = harness.smoke_config(**{k: v for k, v in fields.items()
                                          if k not in ("presets", "model_batch_size", "repeats", "warmup")})
        else:
            cfg = harness.ThroughputConfig(base=base, **fields)
    except ValueError as err:
        return fail(prog, err)
    if not args.no_allocator_tuning:
        from workbench.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    results = harness.run_throughput(cfg, log=lambda line: print(line, flush=True))
    print(harness.format_throughput(results))
    try:
        write_json(args.json, results)
        figure = args.figure or (args.json.with_suffix(".png") if args.json else None)
        if figure is not None:
            _figure(results, figure)
    except OSError as err:
        return fail(prog, f"could not write: {err}")
    return 0


def _figure(results: dict[str, Any], path: Path) -> None:
    try:
        from workbench.bench.harness import records_table
        from workbench.bench.plots import throughput_figure
    except ImportError as err:  # pragma: no cover - matplotlib / pandas come with the notebooks extra
        print(f"figure skipped: {err}")
        return
    import matplotlib

    matplotlib.use("Agg")
    env = results["environment"]
    throughput_figure(records_table([results]), path,
                      title=f"{results['this_machine']['name']}, {env['threads']} threads, torch {env['torch']}, "
                            f"{env['date'][:10]}")
    print(f"wrote {path}")


def run_model_command(args: argparse.Namespace) -> int:
    from workbench.bench import perfmodel as pm
    from workbench.bench.plots import prediction_table

    prog = "workbench bench model"
    try:
        table = pm.load_devices(str(args.devices_file) if args.devices_file else None)
        for d in args.devices:
            check(d in table, "devices", "known devices are " + ", ".join(table), d)
        for s in args.shapes:
            pm.shape(s)
        check(0 <= args.overlap <= 1, "overlap", "must be in [0, 1]", args.overlap)
        df = prediction_table(list(args.shapes), list(args.devices), ep=args.ep, tokens=args.tokens,
                              dtype=args.dtype, device_table=table, overlap=args.overlap)
    except (ValueError, OSError) as err:
        return fail(prog, err)
    print(f"predicted training throughput per device, EP={args.ep}, {args.dtype}; low / table / high ends of the "
          "device bands (contested Ascend figures give the widest)")
    print(f"{'shape':<24} {'device':<12} {'tokens/s (low-high)':>26} {'MFU (low-high)':>20} {'a2a share':>9}")
    for r in df.itertuples():
        lo, hi = sorted((r.tokens_per_s_low, r.tokens_per_s_high))
        mlo, mhi = sorted((r.mfu_low, r.mfu_high))
        print(f"{r.shape:<24} {r.device:<12} {r.tokens_per_s_value:>9,.0f} ({lo:>6,.0f}-{hi:>6,.0f}) "
              f"{100 * r.mfu_value:>6.1f}% ({100 * mlo:.0f}-{100 * mhi:.0f}%) {100 * r.a2a_share_value:>8.0f}%")
    out: dict[str, Any] = {"predictions": df.to_dict(orient="records"), "ep": args.ep, "dtype": args.dtype}
    if args.published:
        errors = pm.published_errors(devices=table)
        out["published"] = errors
        print("\nmodel against published figures (table values; error = predicted / published - 1):")
        for e in errors:
            if e["end"] == "value":
                print(f"  {e['key']:<26} {e['metric']:<26} published {e['published']:>10.4g} predicted "
                      f"{e['predicted']:>10.4g} error {100 * e['error']:+.0f}%")
    try:
        write_json(args.json, out)
        if args.figure is not None:
            import matplotlib

            matplotlib.use("Agg")
            from workbench.bench.plots import plot_predictions

            ax = plot_predictions(df)
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            ax.figure.tight_layout()
            ax.figure.savefig(args.figure, dpi=110)
            print(f"wrote {args.figure}")
    except OSError as err:
        return fail(prog, f"could not write: {err}")
    return 0


def run_devices_command(args: argparse.Namespace) -> int:
    from workbench.bench import perfmodel as pm

    try:
        table = pm.load_devices(str(args.file) if args.file else None)
    except (ValueError, OSError) as err:
        return fail("workbench bench devices", err)
    for dev in table.values():
        print(f"{dev.key}: {dev.name} (node of {dev.node_size})")
        for name, f in dev.figures.items():
            band = f" [{f.low:g}-{f.high:g}]" if f.low is not None and f.high is not None else ""
            value = "n/a" if f.value is None else f"{f.value:g}"
            print(f"  {name:<16} {value:>7}{band:<16} {f.status:<11} {f.source}")
            for alt in f.alternatives:
                print(f"  {'':<16} {'':>7}{'':<16} {'alt.':<11} {alt}")
    return 0


RUNNERS = {"throughput": run_throughput_command, "model": run_model_command, "devices": run_devices_command}
