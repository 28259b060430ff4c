"""The throughput harness: an MoE layer or the whole model, forward or forward + backward, on every
backend this machine has, with the analytic model's prediction next to each measurement.

    workbench bench throughput --json benchmarks/throughput-cpu2.json

A measurement is the median step time of ``repeats`` steps after ``warmup`` untimed ones, each step
bracketed by the device's synchronise; from it come tokens/s, achieved TFLOP/s (the matmul FLOPs of
``perfmodel``), MFU against a matmul timed in the same run (``peak.measure_matmul_peak``) and, where
the device table knows the device, against its datasheet peak. Peak memory: the allocator's peak on
CUDA / NPU; on CPU the process's peak resident set during the steps (``VmHWM``, reset through
``/proc/self/clear_refs``, Linux >= 4.0) minus the resident set before them, after ``malloc_trim``
has handed the C allocator's free pools back to the OS (else memory freed by earlier steps would be
reused unseen). It counts activations, gradients and workspaces, not the weights made before.

Backends are found at run time: PyTorch on CPU, CUDA and Ascend (``torch_npu``), and MindSpore through
``workbench.ms.bench`` (``measure_layer``, ``measure_train_step``). One that is missing is reported
as unavailable with a one-sentence reason, never as an error.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from workbench.bench import perfmodel
from workbench.bench.peak import _synchronizer, measure_copy_bandwidth, measure_matmul_peak
from workbench.validation import check, check_choice, check_int

SWEEPS = ("tokens", "granularity", "top_k", "capacity_factor")
ROUTINGS = ("learned", "uniform")  # softmax top-k as trained, or forced round-robin balance
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MINDSPORE_MODES = ("pynative", "graph")  # workbench.ms.bench.MODES; that module is imported only to run


# --- backends ---------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str  # torch-cpu, torch-cuda, torch-npu, mindspore
    available: bool
    reason: str = ""  # why not, when unavailable
    device: str = ""  # the torch device string, or MindSpore's target
    device_name: str = ""


def _torch_npu_available() -> tuple[bool, str]:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False, "torch_npu is not installed (pip install torch-npu, matching this torch)."
    if not torch.npu.is_available():  # type: ignore[attr-defined]
        return False, "torch_npu is installed but sees no Ascend NPU."
    return True, ""


def mindspore_bench():
    """``workbench.ms.bench`` and a reason: (module, "") or (None, one sentence why not)."""
    try:
        importlib.metadata.version("mindspore")
    except importlib.metadata.PackageNotFoundError:
        return None, "MindSpore is not installed (pip install 'moe-workbench[mindspore]')."
    try:
        return importlib.import_module("workbench.ms.bench"), ""
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("workbench.ms"):
            return None, "this workbench has no MindSpore benchmark (workbench.ms.bench is missing)."
        return None, f"workbench.ms.bench could not be imported: {err}."
    except Exception as err:  # a MindSpore install that fails on import is still "unavailable"
        return None, f"workbench.ms.bench failed to import: {type(err).__name__}: {err}."


def discover_backends() -> list[Backend]:
    """Every backend the harness knows, available or not (with the reason)."""
    out = [Backend("torch-cpu", True, device="cpu", device_name=cpu_name())]
    if torch.cuda.is_available():
        out.append(Backend("torch-cuda", True, device="cuda", device_name=torch.cuda.get_device_name(0)))
    else:
        out.append(Backend("torch-cuda", False, "this torch build has no usable CUDA device."))
    ok, why = _torch_npu_available()
    out.append(Backend("torch-npu", ok, why, device="npu" if ok else "",
                       device_name=torch.npu.get_device_name(0) if ok else ""))  # type: ignore[attr-defined]
    module, why = mindspore_bench()
    out.append(Backend("mindspore", module is not None, why, device="CPU" if module is not None else ""))
    return out


# --- environment ------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it; None outside git."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What the figures were measured on, and when."""
    from workbench.kernels import cpu as cpu_kernels

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(), "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_npu": _version("torch_npu"), "mindspore": _version("mindspore"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "fused_cpu_kernel": cpu_kernels.enabled() and cpu_kernels.kernel_available(),
        "load_average": list(os.getloadavg()),
        # another job of this project's machine runs while /tmp/wb-busy exists: figures are then shared
        "machine_shared": Path("/tmp/wb-busy").exists(),
    }


# --- timing and memory ------------------------------------------------------------------------


def time_steps(step: Callable[[], Any], *, repeats: int, warmup: int, sync: Callable[[], Any] = lambda: None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed ones; each timed
    call starts and ends with ``sync()`` (so queued device work lands in the right step)."""
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        step()
        sync()
        times.append(clock() - t0)
    return times


def _rss_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Return glibc's free pools to the OS (a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: ``with PeakMemory(device) as pm: ...; pm.bytes`` (None if unknown).

    CUDA / NPU: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation at
    entry. CPU (Linux): peak resident set after trimming the C allocator's pools and resetting the
    peak (``/proc/self/clear_refs``), minus the resident set at entry. ``how`` names the measure.
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self.how = "unavailable"

    def __enter__(self) -> PeakMemory:
        kind = self.device.type
        if kind in ("cuda", "npu"):
            mod = getattr(torch, kind)
            mod.reset_peak_memory_stats(self.device)
            self._start = mod.memory_allocated(self.device)
            self.how = f"torch.{kind}.max_memory_allocated"
        else:
            self._start = None
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
                self._start = _rss_kib("VmRSS")
                self.how = "peak RSS (VmHWM after malloc_trim and /proc/self/clear_refs) minus RSS at start"
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        kind = self.device.type
        if kind in ("cuda", "npu"):
            self.bytes = getattr(torch, kind).max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            hwm = _rss_kib("VmHWM")
            self.bytes = None if hwm is None else max(0, hwm - self._start) * 1024


def summarize(step_s: list[float], *, tokens: int, flops_per_step: float, matmul_peak_flops: float | None,
              datasheet_peak_flops: float | None = None) -> dict[str, Any]:
    """Median step time and what follows from it: tokens/s, TFLOP/s, MFU against the matmul measured
    in the run and against a datasheet peak (None where there is none)."""
    check(len(step_s) > 0, "step_s", "needs at least one timed step", step_s)
    med = statistics.median(step_s)
    achieved = flops_per_step / med
    return {"step_s_median": med, "step_s": list(step_s), "tokens": tokens, "tokens_per_s": tokens / med,
            "flops_per_step": flops_per_step, "tflops": achieved / 1e12,
            "mfu_measured_peak": achieved / matmul_peak_flops if matmul_peak_flops else None,
            "mfu_datasheet": achieved / datasheet_peak_flops if datasheet_peak_flops else None}


# --- cases ------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class LayerCase:
    """One MoE layer measurement: shape, dispatch, routing, pass."""

    tokens: int = 4096  # tokens per step (T)
    d_model: int = 256  # model width (D)
    num_experts: int = 16  # experts (E)
    top_k: int = 2  # experts per token (K)
    expert_hidden: int = 512  # expert hidden size (H)
    dispatch: str = "sorted"
    routing: str = "learned"
    capacity_factor: float | None = 1.25  # capacity dispatch: slots per expert = capacity_factor x T x K / E
    backward: bool = True

    def __post_init__(self) -> None:
        for name in ("tokens", "d_model"):
            check_int(name, getattr(self, name), 1)
        check_choice("routing", self.routing, ROUTINGS)
        self.moe_config()  # MoEConfig names a bad num_experts, top_k, expert_hidden, dispatch, capacity_factor

    def moe_config(self):
        from workbench.config import MoEConfig

        return MoEConfig(num_experts=self.num_experts, top_k=self.top_k, expert_hidden=self.expert_hidden,
                         dispatch=self.dispatch, capacity_factor=self.capacity_factor,
                         router="uniform" if self.routing == "uniform" else "softmax_topk")

    def flops(self) -> float:
        return perfmodel.moe_layer_flops(self.tokens, self.d_model, self.num_experts, self.top_k,
                                         self.expert_hidden, self.backward)


def sweep_cases(kind: str, base: LayerCase, values: Iterable[float] | None = None) -> list[LayerCase]:
    """The layer cases of one sweep around ``base``:

    - ``tokens``: tokens per step (by default 1/8 to 2x the base's, in powers of two);
    - ``granularity``: factor g: g x the experts and top-k, 1/g of the hidden size (same active FLOPs);
    - ``top_k``: experts per token (active FLOPs grow with it);
    - ``capacity_factor``: the capacity dispatch's slots per expert.
    """
    check_choice("sweep", kind, SWEEPS)
    defaults = {"tokens": tuple(max(1, base.tokens * f // 8) for f in (1, 2, 4, 8, 16)), "granularity": (1, 2, 4, 8),
                "top_k": tuple(k for k in (1, 2, 4, 8) if k <= base.num_experts),
                "capacity_factor": (0.5, 1.0, 1.25, 2.0)}
    out = []
    for v in values if values is not None else defaults[kind]:
        if kind == "tokens":
            out.append(replace(base, tokens=int(v)))
        elif kind == "granularity":
            g = int(v)
            check(base.expert_hidden % g == 0, "granularity", f"must divide expert_hidden={base.expert_hidden}", g)
            out.append(replace(base, num_experts=base.num_experts * g, top_k=base.top_k * g,
                               expert_hidden=base.expert_hidden // g))
        elif kind == "top_k":
            out.append(replace(base, top_k=int(v)))
        else:
            out.append(replace(base, dispatch="capacity", capacity_factor=float(v)))
    return out


def _torch_dtype(dtype: str) -> torch.dtype:
    check_choice("dtype", dtype, DTYPES)
    return getattr(torch, dtype)


def measure_torch_layer(case: LayerCase, *, device: str = "cpu", dtype: str = "float32", repeats: int = 10,
                        warmup: int = 2, seed: int = 0, matmul_peak_flops: float | None = None,
                        datasheet_peak_flops: float | None = None) -> dict[str, Any]:
    """Time one MoE layer (PyTorch) as ``case`` says; a record with the measurement's figures."""
    from workbench.moe import MoELayer

    dev = torch.device(device)
    torch.manual_seed(seed)
    layer = MoELayer(case.d_model, case.moe_config()).to(dev, _torch_dtype(dtype))
    x = torch.randn(1, case.tokens, case.d_model, device=dev, dtype=_torch_dtype(dtype), requires_grad=case.backward)
    grad = torch.randn_like(x)
    dropped: list[int] = []  # assignments that lost their slot (capacity dispatch), per step

    def step():
        if case.backward:
            y, info = layer(x)
            y.backward(grad)
            x.grad = None
            layer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                y, info = layer(x)
        dropped.append(int(info.stats.dropped_assignments))

    with PeakMemory(dev) as mem:
        times = time_steps(step, repeats=repeats, warmup=warmup, sync=_synchronizer(dev))
    record = {"backend": f"torch-{dev.type}", "kind": "layer", **asdict(case), "dtype": dtype, "device": str(dev),
              **summarize(times, tokens=case.tokens, flops_per_step=case.flops(), matmul_peak_flops=matmul_peak_flops,
                          datasheet_peak_flops=datasheet_peak_flops),
              "peak_memory_bytes": mem.bytes, "peak_memory_how": mem.how,
              "dropped_fraction": statistics.median(dropped) / (case.tokens * case.top_k)}
    return record


def measure_torch_model(preset_name: str, *, batch_size: int, backward: bool = True, optimizer: bool = False,
                        device: str = "cpu", dtype: str = "float32", repeats: int = 5, warmup: int = 2, seed: int = 0,
                        routing: str = "learned", matmul_peak_flops: float | None = None,
                        datasheet_peak_flops: float | None = None) -> dict[str, Any]:
    """Time the whole model of a preset (PyTorch) on random tokens: forward (no autograd) or forward +
    backward of the loss (no optimizer step, which the analytic model leaves out too); with
    ``optimizer``, the trainer's whole step (backward, global-norm clipping, AdamW), as MindSpore's
    ``measure_train_step`` times it."""
    from workbench.config import preset
    from workbench.model import MoELM

    check_int("batch_size", batch_size, 1)
    check_choice("routing", routing, ROUTINGS)
    cfg = preset(preset_name, **({"router": "uniform"} if routing == "uniform" else {}))
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = MoELM(cfg).to(dev, _torch_dtype(dtype))
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), device=dev)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    check(backward or not optimizer, "optimizer", "needs backward=True", optimizer)
    if optimizer:
        from workbench.train import TrainConfig
        from workbench.train.trainer import build_optimizer

        train_cfg = TrainConfig()
        opt = build_optimizer(model, train_cfg)

    def step():
        if optimizer:
            model(inputs, targets).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        elif backward:
            model(inputs, targets).loss.backward()  # loss = LM loss + weighted balancing losses
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(inputs, targets)

    with PeakMemory(dev) as mem:
        times = time_steps(step, repeats=repeats, warmup=warmup, sync=_synchronizer(dev))
    n = batch_size * cfg.seq_len
    flops = cfg.flops_per_token() * n * (1 if backward else 1 / 3)
    return {"backend": f"torch-{dev.type}", "kind": "model", "preset": preset_name, "batch_size": batch_size,
            "seq_len": cfg.seq_len, "backward": backward, "optimizer_step_included": optimizer, "routing": routing,
            "dtype": dtype, "device": str(dev),
            **summarize(times, tokens=n, flops_per_step=flops, matmul_peak_flops=matmul_peak_flops,
                        datasheet_peak_flops=datasheet_peak_flops),
            "peak_memory_bytes": mem.bytes, "peak_memory_how": mem.how}


def measure_mindspore(kind: str, *, preset_name: str = "small", batch_size: int = 8, case: LayerCase | None = None,
                      mode: str = "pynative", repeats: int = 10, warmup: int = 3,
                      matmul_peak_flops: float | None = None) -> dict[str, Any]:
    """A MindSpore measurement through ``workbench.ms.bench``, or ``{"available": False, "reason"}``."""
    module, why = mindspore_bench()
    if module is None:
        return {"backend": "mindspore", "kind": kind, "available": False, "reason": why}
    if kind == "model":
        from workbench.config import preset

        cfg = preset(preset_name)
        raw = module.measure_train_step(cfg, batch_size, mode=mode, steps=repeats, warmup=warmup)
        tokens = raw["tokens_per_step"]
        flops = cfg.flops_per_token() * tokens
        extra = {"preset": preset_name, "batch_size": batch_size, "seq_len": cfg.seq_len, "backward": True,
                 "optimizer_step_included": True}
    else:
        case = case or LayerCase()
        raw = module.measure_layer(case.moe_config(), case.d_model, case.tokens, case.dispatch, mode=mode,
                                   backward=case.backward, repeats=repeats, warmup=warmup)
        tokens, flops, extra = raw.get("tokens", case.tokens), case.flops(), asdict(case)
    return {"backend": "mindspore", "kind": kind, "available": True, **extra, "mode": raw.get("mode", mode),
            "device": raw.get("device"), "mindspore_version": raw.get("mindspore_version"), "dtype": "float32",
            "routing": "learned",
            **summarize(raw["step_s"], tokens=tokens, flops_per_step=flops, matmul_peak_flops=matmul_peak_flops),
            "peak_memory_bytes": raw.get("peak_memory_bytes"), "peak_memory_how": raw.get("peak_memory_how")}


# --- a whole run ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ThroughputConfig:
    """What ``run_throughput`` measures (``smoke_config``: every size shrunk for a quick check). Each
    field, and each of ``base``'s sizes, is a flag of ``workbench bench throughput``; the comment is its help."""

    base: LayerCase = LayerCase()
    dispatches: tuple[str, ...] = ("sorted", "capacity", "loop")  # comma-separated dispatches to time
    routings: tuple[str, ...] = field(default=ROUTINGS, metadata={"allowed": ROUTINGS})  # comma-separated
    sweeps: tuple[str, ...] = field(default=SWEEPS, metadata={"allowed": SWEEPS})  # comma-separated; empty: none
    presets: tuple[str, ...] = ("tiny", "small")  # comma-separated whole models to time
    model_batch_size: int = field(default=8, metadata={"flag": "batch-size"})  # sequences per step of the models
    mindspore: bool = True  # time MindSpore too, where it is installed
    # GRAPH compiles during the warm-up steps
    mindspore_mode: str = field(default="graph", metadata={"choices": MINDSPORE_MODES})  # how MindSpore runs
    mindspore_presets: tuple[str, ...] | None = None  # whole models timed in MindSpore; None: the presets
    device: str = "cpu"  # cpu, cuda[:N] or npu[:N]
    dtype: str = field(default="float32", metadata={"choices": DTYPES})  # parameter dtype
    repeats: int = 10  # timed steps per measurement (median)
    warmup: int = 2  # untimed steps first
    peak_matmul_size: int = 2048  # n of the n x n x n matmul that measures this machine's peak
    peak_copy_bytes: int = 256 << 20  # bytes of the copy that measures its bandwidth

    def __post_init__(self) -> None:
        from workbench.moe import DISPATCHES

        for d in self.dispatches:
            check_choice("dispatches", d, DISPATCHES)
        for r in self.routings:
            check_choice("routings", r, ROUTINGS)
        for s in self.sweeps:
            check_choice("sweeps", s, SWEEPS)
        for name, minimum in (("repeats", 1), ("warmup", 0), ("model_batch_size", 1)):
            check_int(name, getattr(self, name), minimum)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("mindspore_mode", self.mindspore_mode, MINDSPORE_MODES)


def smoke_config(**overrides: Any) -> ThroughputConfig:
    """A run of a few seconds: small shapes, two repeats, short sweeps."""
    base = LayerCase(tokens=256, d_model=64, num_experts=8, top_k=2, expert_hidden=128)
    return ThroughputConfig(**{"base": base, "presets": ("tiny",), "model_batch_size": 2, "repeats": 2, "warmup": 1,
                               "peak_matmul_size": 1024, "peak_copy_bytes": 32 << 20, **overrides})


def this_machine(device: str = "cpu", dtype: str = "float32", matmul_size: int = 2048,
                 copy_bytes: int = 256 << 20) -> tuple[perfmodel.Device, dict[str, float]]:
    """"This machine" for the analytic model, measured now: matmul peak and copy bandwidth."""
    peak = measure_matmul_peak(device, _torch_dtype(dtype), size=matmul_size)
    bw = measure_copy_bandwidth(device, nbytes=copy_bytes)
    name = cpu_name() if torch.device(device).type == "cpu" else str(device)
    return perfmodel.measured_device(peak, bw, name=name, dtype=DTYPES[dtype]), {"matmul_peak_flops": peak,
                                                                                 "copy_bandwidth_bytes_s": bw}


def _model_layer(record: dict[str, Any], dev: perfmodel.Device) -> float:
    return perfmodel.predict_moe_layer(record["tokens"], record["d_model"], record["num_experts"], record["top_k"],
                                       record["expert_hidden"], dev, dtype=DTYPES[record["dtype"]],
                                       backward=record["backward"])


def _model_model(record: dict[str, Any], dev: perfmodel.Device) -> float:
    from workbench.config import preset

    shp = perfmodel.shape_from_model_config(preset(record["preset"]), record["preset"])
    return perfmodel.predict(shp, dev, tokens=record["tokens"], dtype=DTYPES[record["dtype"]],
                             backward=record["backward"]).step_s


def attach_prediction(record: dict[str, Any], dev: perfmodel.Device) -> dict[str, Any]:
    """Add the analytic model's step time and its error against the measured median to a record."""
    if not record.get("available", True):
        return record
    pred = _model_layer(record, dev) if record["kind"] == "layer" else _model_model(record, dev)
    record["model_step_s"] = pred
    record["model_error"] = perfmodel.relative_error(pred, record["step_s_median"])
    return record


def run_throughput(cfg: ThroughputConfig, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Measure everything ``cfg`` lists on this machine; JSON-ready results with the environment,
    the backends found, the measured peaks and one record per measurement (with the model's step
    time and error)."""
    env = environment()
    backends = discover_backends()
    log("backends: " + "; ".join(f"{b.name} {'yes' if b.available else 'no: ' + b.reason}" for b in backends))
    dev, peaks = this_machine(cfg.device, cfg.dtype, cfg.peak_matmul_size, cfg.peak_copy_bytes)
    peak = peaks["matmul_peak_flops"]
    log(f"this machine: {peak / 1e9:,.1f} GFLOP/s matmul ({cfg.dtype}), "
        f"{peaks['copy_bandwidth_bytes_s'] / 1e9:,.1f} GB/s copy")
    records: list[dict[str, Any]] = []

    def add(rec: dict[str, Any], label: str) -> None:
        rec["label"] = label
        records.append(attach_prediction(rec, dev))
        if rec.get("available", True):
            log(f"{label}: {rec['step_s_median'] * 1e3:,.1f} ms, {rec['tokens_per_s']:,.0f} tokens/s, "
                f"{rec['tflops'] * 1e3:,.1f} GFLOP/s, model {rec['model_step_s'] * 1e3:,.1f} ms "
                f"({100 * rec['model_error']:+.0f}%)")
        else:
            log(f"{label}: unavailable: {rec['reason']}")

    kw = dict(device=cfg.device, dtype=cfg.dtype, repeats=cfg.repeats, warmup=cfg.warmup, matmul_peak_flops=peak)
    for backward in (False, True):
        for dispatch in cfg.dispatches:
            for routing in cfg.routings:
                case = replace(cfg.base, dispatch=dispatch, routing=routing, backward=backward)
                add(measure_torch_layer(case, **kw), f"layer {dispatch} {routing} {'fwd+bwd' if backward else 'fwd'}")
    for kind in cfg.sweeps:
        for case in sweep_cases(kind, cfg.base):
            rec = measure_torch_layer(case, **kw)
            rec["sweep"] = kind
            add(rec, f"sweep {kind}: E={case.num_experts} k={case.top_k} H={case.expert_hidden} T={case.tokens}"
                     f" cf={case.capacity_factor}")
    for name in cfg.presets:
        for backward in (False, True):
            for routing in cfg.routings if backward else ("learned",):
                add(measure_torch_model(name, batch_size=cfg.model_batch_size, backward=backward, routing=routing,
                                        **kw), f"model {name} {'fwd+bwd' if backward else 'fwd'} {routing}")
    if cfg.mindspore:  # PyTorch's whole training step beside MindSpore's, which includes the optimizer
        for name in cfg.presets if cfg.mindspore_presets is None else cfg.mindspore_presets:
            add(measure_torch_model(name, batch_size=cfg.model_batch_size, optimizer=True, **kw),
                f"model {name} train step")
        ms_kw = dict(mode=cfg.mindspore_mode, repeats=cfg.repeats, warmup=cfg.warmup, matmul_peak_flops=peak)
        add(measure_mindspore("layer", case=replace(cfg.base, backward=True), **ms_kw), "mindspore layer fwd+bwd")
        for name in cfg.presets if cfg.mindspore_presets is None else cfg.mindspore_presets:
            add(measure_mindspore("model", preset_name=name, batch_size=cfg.model_batch_size, **ms_kw),
                f"mindspore model {name} train step")
    env["load_average_after"] = list(os.getloadavg())  # a busy spell during the run shows here
    return {"benchmark": "throughput", "environment": env, "backends": [asdict(b) for b in backends],
            "this_machine": {**peaks, "name": dev.name, "dtype": cfg.dtype},
            "config": {**asdict(cfg), "base": asdict(cfg.base)}, "records": records}


def expert_parallel_check(result: dict[str, Any]) -> dict[str, Any]:
    """The model's all-to-all bytes against a ``workbench bench expert-parallel`` result: every rank
    sends ``4 T k D b (1 - 1/P)`` per MoE layer and micro-batch (fp32 on CPU), balanced routing assumed;
    the measurement's routing is learned, so its off-rank share differs a little from ``1 - 1/P``."""
    from workbench.config import preset

    cfg = preset(result["preset"])
    par = result["expert_parallel"]
    shp = perfmodel.shape_from_model_config(cfg, result["preset"])
    micro_per_rank = result["grad_accum"] // par["processes"]
    per_micro = perfmodel.all_to_all_bytes(result["batch_size"] * cfg.seq_len, shp.top_k, cfg.d_model,
                                           par["expert_parallel"], dtype_bytes=4)
    predicted = par["processes"] * micro_per_rank * shp.n_moe_layers * per_micro
    measured = par["bytes_moved_per_step"]
    return {"preset": result["preset"], "expert_parallel": par["expert_parallel"], "date": result["date"],
            "measured_bytes": measured, "predicted_bytes": predicted,
            "error": perfmodel.relative_error(predicted, measured)}


def format_throughput(results: dict[str, Any]) -> str:
    """A table of the records: measured median, model, error, tokens/s, MFU, peak memory."""
    m = results["this_machine"]
    lines = [f"{results['environment']['cpu']} ({results['environment']['threads']} threads), "
             f"{results['environment']['date']}; matmul {m['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s, "
             f"copy {m['copy_bandwidth_bytes_s'] / 1e9:,.1f} GB/s",
             f"{'measurement':<58} {'ms':>9} {'model ms':>9} {'error':>7} {'tokens/s':>10} {'MFU':>6} {'peak MB':>8}"]
    for r in results["records"]:
        if not r.get("available", True):
            lines.append(f"{r['label']:<58} unavailable: {r['reason']}")
            continue
        mem = "" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**20:,.0f}"
        mfu = "" if r.get("mfu_measured_peak") is None else f"{100 * r['mfu_measured_peak']:.0f}%"
        lines.append(f"{r['label']:<58} {r['step_s_median'] * 1e3:>9,.1f} {r['model_step_s'] * 1e3:>9,.1f} "
                     f"{100 * r['model_error']:>+6.0f}% {r['tokens_per_s']:>10,.0f} {mfu:>6} {mem:>8}")
    return "\n".join(lines)


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Throughput results (``workbench bench throughput --json``) from files; other benchmark files
    in the same folder (layer, train, expert-parallel) are skipped."""
    import json

    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if isinstance(data, dict) and data.get("benchmark") == "throughput":
            data["path"] = str(p)
            out.append(data)
    return out


def records_table(results: Iterable[dict[str, Any]]):
    """One pandas row per record of every result, with the machine (GPU name, or this machine's CPU)
    and the date it was measured on."""
    import pandas as pd

    rows = []
    for res in results:
        env = res["environment"]
        machine = env.get("cuda_device") or res["this_machine"].get("name") or env.get("cpu")
        for r in res["records"]:
            if r.get("available", True):
                rows.append({**r, "machine": machine, "date": env["date"][:10], "file": res.get("path")})
    return pd.DataFrame(rows)
