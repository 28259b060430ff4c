"""``workbench bench``: ``layer``, ``train``, ``expert-parallel``, ``throughput``, ``model``, ``devices``,
``generate``, ``serve`` (``bench mindspore`` is registered by ``workbench.cli.ms``).

Each subcommand's flags are the fields of its config dataclass (``add_config_flags``): the library's
(``LayerBenchConfig``, ``TrainBenchConfig``, ``ThroughputConfig`` with its base ``LayerCase``,
``GenerateBenchConfig``) or,
where the library function takes plain arguments, the dataclass of those arguments below. Besides
them there are only flags for what to do with the result (``--json``, ``--figure``), ``--smoke`` and
``--no-allocator-tuning``. Every bad value is one line on stderr naming it, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.bench import harness
from workbench.bench.generate import GenerateBenchConfig
from workbench.bench.layer import LayerBenchConfig
from workbench.bench.perfmodel import BAND_ENDS, DTYPE_BYTES
from workbench.bench.train import TrainBenchConfig
from workbench.cli.common import (
    Parser,
    add_allocator_flag,
    add_config_flags,
    add_json_flag,
    fail,
    given,
    usage_error,
    write_json,
)
from workbench.config import PRESETS
from workbench.validation import check

_FORMAT = argparse.ArgumentDefaultsHelpFormatter


@dataclass(kw_only=True)
class ExpertParallelBenchArgs:
    """The arguments of ``run_expert_parallel_bench`` (which checks them), one flag each."""

    preset: str = field(default="small", metadata={"choices": PRESETS})  # model preset
    nprocs: int = 2  # processes of the parallel side
    expert_parallel: int = 2  # ranks the experts are split over
    single_threads: int = 2  # torch threads of the single process
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 2  # micro-batches per step (a multiple of --nprocs)
    steps: int = 6  # timed optimizer steps per side and round
    warmup: int = 2  # untimed steps first, per side and round
    rounds: int = 2  # rounds of the two sides taking turns


@dataclass(kw_only=True)
class ModelBenchArgs:
    """What ``workbench bench model`` predicts (``workbench.bench.plots.prediction_table``), one flag each."""

    shapes: tuple[str, ...] = field(
        default=("mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "qwen3-235b-a22b", "telechat3-105b-a4.7b",
                 "gpt-oss-120b"), metadata={"help": "comma-separated shapes (workbench.bench.perfmodel.SHAPES)"})
    devices: tuple[str, ...] = ("H100", "H200", "Ascend910B2")  # comma-separated device keys of the table
    ep: int = 8  # expert-parallel degree
    tokens: int | None = None  # tokens per device per micro-batch; None: one sequence of the shape
    dtype: str = field(default="bf16", metadata={"choices": DTYPE_BYTES})  # GEMM dtype
    overlap: float = 0.0  # fraction of the all-to-all hidden behind compute
    devices_file: Path | None = None  # an edited copy of devices.yaml
    published: bool = False  # also print the error against published figures


@dataclass(kw_only=True)
class ServeBenchArgs:
    """What ``workbench bench serve`` compares (``workbench.bench.serving``), one flag each."""

    measured: tuple[str, ...] = field(default=(), metadata={"help": "comma-separated `workbench bench generate` "
                                      "JSON results to check the model on (this machine's matmul and copy "
                                      "bandwidth are measured first, with each result's torch threads)"})
    matmul_gflops: float | None = None  # fp32 matmul GFLOP/s of this machine for --measured (none: measure now)
    bandwidth_gb_s: float | None = None  # this machine's copy bandwidth in GB/s for --measured (none: measure now)
    end: str = field(default="value", metadata={"choices": BAND_ENDS})  # end of the device figures' bands
    published_file: Path | None = None  # an edited copy of workbench/bench/serving_published.yaml
    devices_file: Path | None = None  # an edited copy of devices.yaml


@dataclass(kw_only=True)
class DeviceTableArgs:
    """What ``workbench bench devices`` prints."""

    file: Path | None = None  # an edited copy of devices.yaml


# The base layer case's dispatch, routing and pass are set by each measurement (--dispatches,
# --routings, both passes), so they are not flags.
_CASE_SET_PER_MEASUREMENT = ("dispatch", "routing", "backward")


def add_parsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``bench`` and its subcommands (each parser's ``run`` default runs it); returns the set of
    ``bench`` subcommands, for ``bench mindspore``."""
    bench = sub.add_parser("bench", help="benchmarks")
    which = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)

    layer = which.add_parser("layer", help="MoE layer forward+backward vs a dense FFN and the loop reference",
                             description="Time an MoE layer's forward + backward with each dispatch against a "
                                         "dense SwiGLU FFN of the same active FLOPs.", formatter_class=_FORMAT)
    add_config_flags(layer, LayerBenchConfig)
    add_json_flag(layer)
    add_allocator_flag(layer)
    layer.set_defaults(run=_run_layer)

    train = which.add_parser("train", help="training throughput (tokens/s, MFU) of the presets",
                             formatter_class=_FORMAT)
    add_config_flags(train, TrainBenchConfig)
    add_json_flag(train)
    train.set_defaults(run=_run_train)

    ep = which.add_parser("expert-parallel", help="training tokens/s: 1 process x T threads vs N processes at EP=P",
                          description="Train a preset in one process with --single-threads threads, then on "
                                      "--nprocs gloo processes with one thread each and its experts split over "
                                      "--expert-parallel of them (the same global batch), taking turns for "
                                      "--rounds rounds; report tokens/s, their ratio and the bytes the "
                                      "all-to-alls moved per step.", formatter_class=_FORMAT)
    add_config_flags(ep, ExpertParallelBenchArgs)
    add_json_flag(ep)
    ep.set_defaults(run=_run_expert_parallel)

    tp = which.add_parser(
        "throughput", help="MoE layer and model throughput on this machine's backends, with the analytic model",
        description="Time an MoE layer (each dispatch, learned and forced-uniform routing, forward and forward + "
                    "backward), sweeps over tokens per step, expert granularity at fixed active FLOPs, top-k and "
                    "capacity factor, and whole presets, on PyTorch (CPU / CUDA / Ascend) and MindSpore where "
                    "present; each with the analytic model's prediction and its error. Writes JSON (environment, "
                    "git commit, date) and a figure.", formatter_class=_FORMAT)
    add_config_flags(tp, harness.LayerCase, skip=_CASE_SET_PER_MEASUREMENT)
    add_config_flags(tp, harness.ThroughputConfig, skip=("base",))
    tp.add_argument("--smoke", action="store_true", help="tiny sizes and 2 repeats: checks the pipeline in seconds")
    add_json_flag(tp, "write the results here")
    tp.add_argument("--figure", type=Path, default=None, help="write the figure here (default: the JSON path, .png)")
    add_allocator_flag(tp)
    tp.set_defaults(run=_run_throughput)

    md = which.add_parser(
        "model", help="the analytic model: real-model shapes on the device table, and its error on published runs",
        description="Predict training tokens/s, TFLOP/s and MFU per device for real-model shapes on the devices of "
                    "the device table, at the low / table / high ends of each contested figure's band; with "
                    "--published, the model against every published figure it is checked on.",
        formatter_class=_FORMAT)
    add_config_flags(md, ModelBenchArgs)
    add_json_flag(md, "write the predictions here")
    md.add_argument("--figure", type=Path, default=None, help="write a bar chart of tokens/s here")
    md.set_defaults(run=_run_model)

    dv = which.add_parser("devices", help="the device table with every figure's source",
                          description="Print the device table (workbench/bench/devices.yaml, or --file) with "
                                      "each figure's band, status and source.", formatter_class=_FORMAT)
    add_config_flags(dv, DeviceTableArgs)
    dv.set_defaults(run=_run_devices)

    gen = which.add_parser(
        "generate", help="generation tokens/s: prefill, KV-cached decode and the recompute baseline",
        description="Continue --prompt-len-byte prompts greedily to the preset's full context at each batch size, "
                    "with the KV cache and by recomputing the prefix at every step, taking turns; report prefill "
                    "and decode tokens/s and the speedup (median of --repeats rounds), then the distinct experts "
                    "a decode step touches per MoE layer against uniform routing. Untrained, seeded weights.",
        formatter_class=_FORMAT)
    add_config_flags(gen, GenerateBenchConfig)
    add_json_flag(gen)
    gen.set_defaults(run=_run_generate)

    sv = which.add_parser(
        "serve", help="the serving model against published serving figures and this machine's generation runs",
        description="Predict prefill and decode tokens/s per device with the serving model (workbench.bench."
                    "serving) for every published MoE serving figure (serving_published.yaml: DeepSeek on H800, "
                    "SGLang on H100, CloudMatrix-Infer on Ascend 910C) in its published setting, and print the "
                    "relative error; with --measured, also against the prefill and cached-decode tokens/s of "
                    "`workbench bench generate` results, after measuring this machine's matmul and bandwidth.",
        formatter_class=_FORMAT)
    add_config_flags(sv, ServeBenchArgs)
    add_json_flag(sv, "write the rows here")
    sv.set_defaults(run=_run_serve)
    return which


# --- layer, train, expert-parallel --------------------------------------------------------------


def torch_device(name: str):
    import torch

    return torch.device(name)


def _run_layer(args: argparse.Namespace) -> int:
    from workbench.bench.layer import format_layer_bench, run_layer_bench
    from workbench.resources import check_fits, layer_bench_bytes
    from workbench.runtime import tune_cpu_allocator

    try:
        cfg = LayerBenchConfig(**given(args, LayerBenchConfig))
        # a lower bound, before any tensor: --tokens 2000000000 used to end in the allocator's traceback
        check_fits("tokens", cfg.tokens, layer_bench_bytes(cfg), torch_device(cfg.device),
                   f"timing {cfg.tokens:,} tokens x top_k={cfg.top_k} x expert_hidden={cfg.expert_hidden}")
    except ValueError as err:
        usage_error("workbench bench layer", str(err))
    if not args.no_allocator_tuning:
        tune_cpu_allocator()
    result = run_layer_bench(cfg, progress=sys.stdout.isatty())
    print(format_layer_bench(result))
    write_json(args.json, result.to_dict())
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from workbench.bench.train import format_train_bench, run_train_bench

    try:
        cfg = TrainBenchConfig(**given(args, TrainBenchConfig))
    except ValueError as err:
        usage_error("workbench bench train", str(err))
    results = run_train_bench(list(cfg.presets), steps=cfg.steps, batch_size=cfg.batch_size, dense=cfg.dense)
    print(format_train_bench(results))
    write_json(args.json, results)
    return 0


def _run_expert_parallel(args: argparse.Namespace) -> int:
    from workbench.bench.expert_parallel import format_expert_parallel_bench, run_expert_parallel_bench

    cfg = ExpertParallelBenchArgs(**given(args, ExpertParallelBenchArgs))
    try:
        result = run_expert_parallel_bench(**dataclasses.asdict(cfg), log=lambda line: print(line, flush=True))
    except ValueError as err:
        usage_error("workbench bench expert-parallel", str(err))
    print(format_expert_parallel_bench(result))
    write_json(args.json, result)
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from workbench.bench.generate import bench_generate, format_generate_bench

    try:
        cfg = GenerateBenchConfig(**given(args, GenerateBenchConfig))
    except ValueError as err:
        return fail("workbench bench generate", err)
    result = bench_generate(cfg.preset, **cfg.bench_kwargs(), log=lambda line: print(line, flush=True))
    result.command = cfg.command(args.json)  # every flag spelt out: the JSON says how to measure it again
    print(format_generate_bench(result))
    write_json(args.json, result.to_dict())
    return 0


# --- the throughput lab: throughput, model, devices ---------------------------------------------


def _smoke_sizes() -> set[str]:
    """The fields ``smoke_config`` sets: under ``--smoke`` they win over the flags."""
    smoke, full = harness.smoke_config(), harness.ThroughputConfig()
    return {f.name for f in dataclasses.fields(full) if getattr(smoke, f.name) != getattr(full, f.name)}


def _run_throughput(args: argparse.Namespace) -> int:
    from workbench.config import preset
    from workbench.train.trainer import resolve_device

    prog = "workbench bench throughput"
    try:
        base = harness.LayerCase(**given(args, harness.LayerCase))
        flags = given(args, harness.ThroughputConfig)
        default = harness.ThroughputConfig()
        for name in (*flags.get("presets", default.presets), *(flags.get("mindspore_presets") or ())):
            preset(name)
        flags["device"] = str(resolve_device(flags.get("device", default.device)))
        if args.smoke:
            cfg = harness.smoke_config(**{k: v for k, v in flags.items() if k not in _smoke_sizes()})
        else:
            cfg = harness.ThroughputConfig(base=base, **flags)
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


def _run_model(args: argparse.Namespace) -> int:
    from workbench.bench import perfmodel as pm
    from workbench.bench.plots import prediction_table

    prog = "workbench bench model"
    a = ModelBenchArgs(**given(args, ModelBenchArgs))
    try:
        table = pm.load_devices(str(a.devices_file) if a.devices_file else None)
        for d in a.devices:
            check(d in table, "devices", "known devices are " + ", ".join(table), d)
        for s in a.shapes:
            pm.shape(s)
        check(0 <= a.overlap <= 1, "overlap", "must be in [0, 1]", a.overlap)
        df = prediction_table(list(a.shapes), list(a.devices), ep=a.ep, tokens=a.tokens, dtype=a.dtype,
                              device_table=table, overlap=a.overlap)
    except (ValueError, OSError) as err:
        return fail(prog, err)
    print(f"predicted training throughput per device, EP={a.ep}, {a.dtype}; low / table / high ends of the "
          "device bands (contested Ascend figures give the widest)")
    print(f"{'shape':<24} {'device':<12} {'tokens/s (low-high)':>26} {'MFU (low-high)':>20} {'a2a share':>9}")
    for r in df.itertuples():
        lo, hi = sorted((r.tokens_per_s_low, r.tokens_per_s_high))
        mlo, mhi = sorted((r.mfu_low, r.mfu_high))
        print(f"{r.shape:<24} {r.device:<12} {r.tokens_per_s_value:>9,.0f} ({lo:>6,.0f}-{hi:>6,.0f}) "
              f"{100 * r.mfu_value:>6.1f}% ({100 * mlo:.0f}-{100 * mhi:.0f}%) {100 * r.a2a_share_value:>8.0f}%")
    out: dict[str, Any] = {"predictions": df.to_dict(orient="records"), "ep": a.ep, "dtype": a.dtype}
    if a.published:
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


def _run_serve(args: argparse.Namespace) -> int:
    from workbench.bench import perfmodel as pm
    from workbench.bench import serving
    from workbench.bench.perfmodel import measured_device

    prog = "workbench bench serve"
    a = ServeBenchArgs(**given(args, ServeBenchArgs))
    try:
        for path in a.measured:
            check(Path(path).is_file(), "measured", "must name `workbench bench generate` JSON files", path)
        check((a.matmul_gflops is None) == (a.bandwidth_gb_s is None), "matmul_gflops",
              "give it with --bandwidth-gb-s (both, or neither to measure them now)", a.matmul_gflops)
        pinned = None
        if a.matmul_gflops is not None:
            pinned = measured_device(a.matmul_gflops * 1e9, a.bandwidth_gb_s * 1e9, name="this machine (given figures)")
        devices = pm.load_devices(str(a.devices_file) if a.devices_file else None)
        published = serving.serving_errors(str(a.published_file) if a.published_file else None, devices, a.end)
    except (ValueError, OSError, KeyError) as err:
        return fail(prog, err)
    print(f"serving model against published figures (device figures at the '{a.end}' end of their bands)")
    print(serving.format_serving_errors(published))
    measured: list[dict[str, Any]] = []
    for path in a.measured:
        try:
            rows = serving.measured_decode_errors(path, pinned)
        except (ValueError, OSError, KeyError) as err:
            return fail(prog, f"{path}: {err}")
        measured += rows
        r0 = rows[0]
        how = "given" if pinned else "measured now"
        print(f"\n{path}: {r0['device']}, {r0['threads']} thread(s): matmul {r0['matmul_gflops']:,.0f} GFLOP/s "
              f"fp32 and copy {r0['bandwidth_gb_s']:,.1f} GB/s {how}; the model in fp32, every cache slot "
              "scored (as the workbench's KV cache does)")
        print(serving.format_measured_errors(rows))
    write_json(args.json, {"published": published, "measured": measured, "end": a.end})
    return 0


def _run_devices(args: argparse.Namespace) -> int:
    from workbench.bench import perfmodel as pm

    a = DeviceTableArgs(**given(args, DeviceTableArgs))
    try:
        table = pm.load_devices(str(a.file) if a.file else None)
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
