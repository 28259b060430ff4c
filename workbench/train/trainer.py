"""The training loop: AdamW, warmup + cosine, clipping, accumulation, evaluation, checkpoints, metrics.

    trainer = Trainer(preset("tiny"), TrainConfig(steps=300, run_dir="runs/demo"))
    trainer.fit()                     # history in trainer.history, also in runs/demo/metrics.jsonl
    Trainer.resume("runs/demo").fit() # continues bit for bit from the newest good checkpoint
    Trainer(cfg, TrainConfig(init_from="runs/demo", trainable="experts", run_dir="runs/ft")).fit()

``init_from`` starts a new run from another run's weights (a run directory's newest usable
checkpoint, or a checkpoint file such as ``workbench upcycle`` writes): the weights only, with a
new optimizer, schedule and step count; every tensor must have this run's shape. ``trainable``
freezes all but one group of parameters, or all but the experts ESFT selects
(``workbench.train.freeze``). ``run.json`` records where the weights came from (``init_from``) and
what trained (``trainable``), and a resume takes the ESFT selection from there.

Batches are a pure function of (seed, step), so the data position in a checkpoint is the step.
Loss-free balancing bias updates run right after ``optimizer.step()``, never inside forward, and
the per-step counters (global-batch aux loss) are reset there (``MoELM.finish_optimizer_step``).

Everything that can be checked is checked when the trainer is built, before the run directory
is touched: the configs, the device, the data (and that the vocabulary covers it), and that
the run directory can be written. ``overwrite=True`` replaces an old run only after all that,
and deletes only what that run wrote (``rundir.clear_run``). ``fit()`` holds the run directory's
lock (``rundir.RunLock``) while it trains, so a second trainer there is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.config import ModelConfig
from workbench.data.fingerprint import fingerprint_difference
from workbench.model import MoELM
from workbench.moe import step_routing_metrics
from workbench.runtime import tune_cpu_allocator
from workbench.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_difference,
    last_good_checkpoint,
    latest_usable_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from workbench.train.config import DEVICES, TrainConfig
from workbench.train.freeze import Freezing, esft_select, freeze, parameter_group, routing_shares
from workbench.train.loggers import JsonlLogger, WandbLogger
from workbench.train.rundir import (
    RUN_FILE,
    RunLock,
    add_outputs,
    check_new_run_dir,
    check_not_locked,
    check_run_dir,
    check_run_dir_name,
    check_run_info,
    clear_run,
    new_run_info,
    read_run_info,
    update_run_info,
)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (``stop_on_signals``): the run ends as Ctrl-C ends it, its status
    recorded; ``exit_status`` is 128 + the signal's number, what a shell reports for that signal."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def stop_on_signals():
    """While inside, SIGTERM and SIGHUP raise ``Stopped`` (a ``KeyboardInterrupt``), so ``kill``, a
    closed terminal or a job scheduler ends a run the way Ctrl-C does: the checkpoint being written
    is finished or removed, ``run.json`` says how it ended. A signal the process was started ignoring
    (``nohup``) stays ignored. Only the main thread can set handlers; elsewhere this does nothing."""
    signums = [s for name in ("SIGTERM", "SIGHUP") if (s := getattr(signal, name, None)) is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    # a signal this process was started ignoring stays ignored (nohup: SIGHUP must not stop the run)
    previous = {s: signal.signal(s, stop) for s in signums if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``TrainConfig.device``; ``ValueError`` naming ``device`` when this
    process cannot use it (no CUDA in this torch build, no such GPU index, no torch_npu...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def refuse(why: str) -> ValueError:
        usable = ["auto", "cpu"] + [f"cuda (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
                                    if torch.cuda.is_available() else ""]
        return ValueError(f"device={name!r} is invalid: {why}; usable here: {', '.join(u for u in usable if u)}")

    if name.partition(":")[0] == "npu":  # torch knows the npu device only once torch_npu is imported
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise refuse("Ascend NPUs need torch_npu (pip install torch-npu, matching this torch)") from None
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is invalid: allowed values are {', '.join(DEVICES)}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise refuse("this torch build cannot use CUDA (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise refuse(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise refuse("MPS (Apple GPUs) is not available to this torch")
    elif device.type == "npu":
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            raise refuse("torch_npu finds no Ascend NPU")
        if device.index is not None and device.index >= npu.device_count():
            raise refuse(f"this machine has {npu.device_count()} NPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device={name!r} is invalid: allowed values are {', '.join(DEVICES)}")
    return device


def data_fingerprint(cfg: TrainConfig, data: Any) -> dict[str, Any] | None:
    """The fingerprint of the text ``data`` holds (``workbench.data.fingerprint``); None for data
    that is not built from a ``Corpus`` (then a resume cannot check it)."""
    from workbench.data import Corpus
    from workbench.data.fingerprint import corpus_fingerprint

    corpus = getattr(data, "corpus", None)
    return corpus_fingerprint(corpus, builtin=cfg.data is None) if isinstance(corpus, Corpus) else None


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and stacked expert matrices) only.

    Norm gains and biases (1-D) are not decayed; the router's balancing bias is a buffer, not
    a parameter, so the optimizer never sees it.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass. On 2 CPU cores it takes the tiny MoE's
    # step from about 18 ms (foreach: a dozen element-wise sweeps, each a parallel region) to
    # about 5 ms; an MoE has several times the parameters of its dense twin, so this matters
    # more for it. Same update rule; the results differ from foreach only in fp32 rounding.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {"foreach": True}))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_data(cfg: TrainConfig, seq_len: int):
    """The built-in corpus, or the user's file / folder when ``cfg.data`` names one.

    Too little text is blamed on its source (``data`` or ``max_bytes_per_domain``), not on ``seq_len``.
    """
    from workbench.data import DEFAULT_MAX_BYTES_PER_DOMAIN, DataTooSmallError, LMData, build_corpus, load_text_corpus

    if cfg.data is None:
        with warnings.catch_warnings(record=True) as left_out:  # a tiny budget leaves domains out: say it once
            warnings.simplefilter("always")
            corpus = build_corpus(max_bytes_per_domain=cfg.max_bytes_per_domain)
    else:
        left_out = []
        corpus = load_text_corpus(cfg.data)
    try:
        data = LMData(corpus, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                      val_fraction=cfg.val_fraction, val_windows_per_domain=cfg.eval_windows,
                      train_domains=cfg.train_domains)
    except DataTooSmallError as err:
        tokens, window = err.train_tokens, err.window
        if cfg.data is None:
            raise ValueError(f"max_bytes_per_domain={cfg.max_bytes_per_domain} is invalid: the built-in corpus "
                             f"then has {tokens} training tokens, fewer than one window of seq_len + 1 = {window} "
                             f"(the default is {DEFAULT_MAX_BYTES_PER_DOMAIN})") from None
        raise ValueError(f"data={cfg.data!r} is too small: its training split has {tokens} tokens, fewer than "
                         f"one window of seq_len + 1 = {window}; give more text or a smaller seq_len") from None
    for w in left_out:
        warnings.warn(w.message, stacklevel=2)
    return data


@dataclass
class EvalResult:
    step: int
    loss: float | None  # over every validation token; None when there is no validation window at all
    loss_per_domain: dict[str, float]  # domains that have validation windows
    routing_matrix: torch.Tensor  # (moe layers, domains, experts) token-expert assignment counts
    domains: list[str]
    missing: dict[str, str] = field(default_factory=dict)  # domain -> why it has no validation loss


# Windows of the target domain's training text whose routing ESFT's selection counts.
ESFT_WINDOWS = 64


def find_init_checkpoint(init_from: str | Path) -> Checkpoint:
    """The checkpoint ``init_from`` names: a run directory's newest usable checkpoint, or a
    checkpoint file (verified as a resume verifies it); ``ValueError`` naming ``init_from``."""
    path = Path(init_from).expanduser()
    shown = f"init_from={str(init_from)!r} is invalid"
    if not path.exists():
        raise ValueError(f"{shown}: the path does not exist (give a run directory or a checkpoint file)")
    run_dir = path if path.is_dir() else path.parent
    run_info = read_run_info(run_dir)
    try:
        if path.is_dir():
            if not list_checkpoints(path):
                raise ValueError(f"{shown}: {path} holds no checkpoint (ckpt-<step>.safetensors)")
            if run_info is not None:
                try:
                    check_run_info(run_dir, run_info)
                except ValueError as err:
                    raise ValueError(f"{shown}: {err}") from None
            ckpt, skipped = latest_usable_checkpoint(path, run_info)
            if ckpt is None:
                raise ValueError(f"{shown}: no usable checkpoint in {path}: {'; '.join(skipped)}")
            return ckpt
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise ValueError(f"{shown}: {err}") from None
    # a run's own checkpoint must be that run's (a file of another name, an upcycled model kept
    # beside the dense run it came from, is not claimed by the run)
    if run_info is not None and re.fullmatch(r"ckpt-\d{8}\.safetensors", path.name):
        if (diff := config_difference(ckpt, run_info)) is not None:
            raise ValueError(f"{shown}: checkpoint {path} belongs to another run than {run_dir} holds: {diff}")
    return ckpt


def load_init_weights(model: torch.nn.Module, ckpt: Checkpoint, init_from: str | Path) -> list[str]:
    """Copy ``ckpt``'s weights into ``model`` exactly; ``ValueError`` naming the first tensor whose
    name or shape does not match (the model is left unchanged then).

    One exception: a loss-free balancing bias (``*.router.bias``) that this run has and the
    checkpoint lacks (its run balanced otherwise) starts at zero, as in any new run: with a zero
    bias the router selects as the checkpoint's did. Returns the names of those biases. The
    reverse, a bias this run would drop, is refused: selection without it is another function.
    """
    want = model.state_dict()
    have = dict(ckpt.model_state)
    shown = f"init_from={str(init_from)!r} does not fit this run's model"
    zero_biases = [name for name in want if name.endswith(".router.bias") and name not in have]
    for name in zero_biases:
        have[name] = torch.zeros_like(want[name], device="cpu")
    for name in want:
        if name not in have:
            raise ValueError(f"{shown}: it has no tensor {name!r} (a dense checkpoint? make an MoE one with "
                             "workbench upcycle)")
        if tuple(have[name].shape) != tuple(want[name].shape):
            raise ValueError(f"{shown}: tensor {name!r} has shape {tuple(have[name].shape)} there and "
                             f"{tuple(want[name].shape)} here")
    extra = [name for name in have if name not in want]
    if extra:
        hint = (" (its loss-free balancing bias: keep it with bias_update_rate > 0)"
                if extra[0].endswith(".router.bias") else "")
        raise ValueError(f"{shown}: its tensor {extra[0]!r} has no place in this run's model{hint}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    model.load_state_dict(have, strict=True)
    return zero_biases


def init_record(ckpt: Checkpoint, init_from: str | Path) -> dict[str, Any]:
    """What ``run.json`` records of the weights a run started from (``init_from``)."""
    from safetensors import safe_open

    path = Path(ckpt.path).resolve()
    with safe_open(str(path), framework="pt") as f:
        sha = (f.metadata() or {}).get("tensors_sha256")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = read_run_info(path.parent) or {}
    return {"given": str(init_from), "path": str(path), "step": ckpt.step, "tensors_sha256": sha,
            "run_dir": str(path.parent) if source else None, "run_started": source.get("started"),
            "run_wandb_id": source.get("wandb_run_id"), "model_config": ckpt.model_config}


class Trainer:
    """Trains ``MoELM(model_cfg)`` as ``cfg`` says; see the module docstring.

    ``overwrite=True`` replaces the run in ``cfg.run_dir``, once everything else has been checked;
    without it a folder holding a run's checkpoints or files is refused, and with it a folder
    holding other files but no run. A folder another process trains in is refused either way.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: Any = None, *, overwrite: bool = False,
                 _resume: bool = False):
        if cfg.data is not None and not _resume:  # recorded absolute: a resume from elsewhere reads the same files
            cfg = replace(cfg, data=os.path.abspath(os.path.expanduser(cfg.data)))
        self.model_cfg, self.cfg = model_cfg, cfg
        self.run_dir = Path(cfg.run_dir)
        check_run_dir_name(cfg.run_dir)
        if self._writes_run_dir:
            check_not_locked(self.run_dir)
        if not _resume:
            check_new_run_dir(self.run_dir, overwrite)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        self.data = data if data is not None else build_data(cfg, model_cfg.seq_len)
        data_vocab = getattr(self.data, "vocab_size", None)
        if data_vocab is not None and model_cfg.vocab_size < data_vocab:
            raise ValueError(f"vocab_size={model_cfg.vocab_size} is invalid: the data's tokenizer produces ids up "
                             f"to {data_vocab - 1}, so it must be >= {data_vocab}")
        # what the run trains on: recorded in run.json, so that a resume on other data is refused
        self.data_fingerprint = data_fingerprint(cfg, self.data)
        if cfg.train_domains is not None and data is not None:
            have = getattr(self.data, "train_domains", None)
            if have is None or sorted(have) != sorted(cfg.train_domains):
                raise ValueError(f"train_domains={list(cfg.train_domains)} is invalid for the data given: it "
                                 f"trains on {have or 'every domain'}; build it with LMData(..., train_domains=...)")
        torch.manual_seed(cfg.seed)
        self.model = MoELM(model_cfg).to(self.device)
        if cfg.trainable != "all" and getattr(self, "parallel", None) is not None:
            raise ValueError(f"trainable={cfg.trainable!r} is invalid under torchrun: freezing is not supported "
                             "with expert or data parallelism yet; fine-tune in one process")
        self.init_from: dict[str, Any] | None = None  # run.json's record of the starting weights
        self.freezing: Freezing | None = None
        self._esft_record: dict[str, Any] | None = None  # how ESFT chose its experts
        if not _resume:
            if cfg.init_from is not None:
                self._init_weights(overwrite)
            selection = self._esft_selection() if cfg.trainable == "esft" else None
            self.freezing = freeze(self.model, cfg.trainable, selection)
        else:  # the same parameters train; Trainer.resume freezes once the checkpoint is loaded
            trained = {id(p) for p in parameter_group(self.model, cfg.trainable).values()}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in trained)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        if not _resume:  # a resumed run is checked when fit() starts: a finished one is never touched
            check_run_dir(self.run_dir)
        # Everything is checked: only now may an old run be replaced (under the lock: not while it trains).
        if overwrite and not _resume:
            with RunLock(self.run_dir):
                clear_run(self.run_dir)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_eval: EvalResult | None = None
        self.metrics_log = JsonlLogger(self.run_dir / "metrics.jsonl")
        self.run_info: dict[str, Any] | None = None  # run.json: read on resume, written when fit() starts
        self.resumed_from: Path | None = None
        self._wandb: WandbLogger | None = None
        self._step_times: list[float] = []

    @property
    def _writes_run_dir(self) -> bool:
        """This process writes the run directory: always, but on the ranks other than 0 of an
        expert-parallel run (``ExpertParallelTrainer`` sets ``parallel`` before building this)."""
        parallel = getattr(self, "parallel", None)
        return parallel is None or parallel.is_main

    @property
    def finished(self) -> bool:
        """The run reached its last step (``cfg.steps``): ``fit()`` has nothing left to do."""
        return self.step >= self.cfg.steps

    def last_checkpoint(self) -> Path | None:
        ckpts = list_checkpoints(self.run_dir)
        return ckpts[-1][1] if ckpts else None

    # --- construction from a checkpoint -----------------------------------------------------

    @classmethod
    def resume(cls, run_dir: str | Path, data: Any = None, *, accept_data_change: bool = False,
               **overrides: Any) -> Trainer:
        """Continue the run in ``run_dir`` from its newest readable checkpoint, exactly.

        The data must be what the run started on (``run.json`` records its fingerprint), else
        ``ValueError`` says which file changed; ``accept_data_change=True`` goes on with the new
        data and records the change in ``run.json`` (``data_changes``).

        Only settings that do not change the function trained may be overridden: ``progress``, and
        ``device`` (a run recorded on a GPU can go on on a CPU; bit for bit only on the same device);
        and ``steps``, which extends the run (a finished one too): the learning-rate schedule then
        runs to the new last step from where the run is.
        """
        allowed = {"progress", "device", "steps"}
        if set(overrides) - allowed:
            raise ValueError(f"cannot override {sorted(set(overrides) - allowed)} when resuming; "
                             f"allowed: {sorted(allowed)}")
        check_run_dir_name(run_dir)
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"run_dir={str(run_dir)!r} is invalid: it is an existing file, not a run folder")
        run_info = read_run_info(run_dir)
        if run_info is not None:  # hand-edited: one line naming run.json and the field
            check_run_info(run_dir, run_info)
        ckpt, skipped = latest_usable_checkpoint(run_dir, run_info)
        if ckpt is None:
            why = f": {'; '.join(skipped)}" if skipped else ""
            raise CheckpointError(f"no readable checkpoint in {run_dir} to resume from{why}")
        cfg = TrainConfig.from_dict({**ckpt.train_config, "run_dir": str(run_dir), **overrides})
        if cfg.steps < ckpt.step:
            raise ValueError(f"steps={cfg.steps} is invalid: the run is at step {ckpt.step} ({ckpt.path.name}); "
                             "a resume can extend a run, not shorten it")
        if "device" not in overrides:  # the device the run recorded may not exist here: say how to go on
            try:
                resolve_device(cfg.device)
            except ValueError as err:
                raise ValueError(f"{err}; the run recorded device={cfg.device!r}: resume it here with --device "
                                 "(e.g. --device auto; Trainer.resume(..., device='auto'))") from None
        trainer = cls(ModelConfig.from_dict(ckpt.model_config), cfg, data, _resume=True)
        try:
            trainer.model.load_state_dict(ckpt.model_state)
            trainer.optimizer.load_state_dict(ckpt.optimizer_state)
            trainer.scheduler.load_state_dict(ckpt.scheduler_state)
        except (RuntimeError, ValueError, KeyError) as err:  # shapes were checked on load; this is a backstop
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model it records: {first}") from err
        trainer._refreeze(run_info)
        restore_rng_state(ckpt.rng_state)
        trainer.step = ckpt.step
        # read only: fit() trims the file to the checkpoint's step, under the run's lock
        trainer.history = [r for r in trainer.metrics_log.read() if r.get("step", 0) <= ckpt.step]
        trainer.resumed_from = ckpt.path
        trainer.run_info = run_info
        if run_info is not None and overrides.keys() & {"device", "steps"}:  # as show reports it
            run_info["train_config"] = {**run_info["train_config"], "device": cfg.device, "steps": cfg.steps}
        if not trainer.finished:  # a finished run trains nothing: its data does not matter
            trainer._check_same_data(accept_data_change)
        return trainer

    # --- starting weights and freezing -------------------------------------------------------

    def _init_weights(self, overwrite: bool) -> None:
        """Load ``cfg.init_from``'s weights into the new model (before anything is written)."""
        ckpt = find_init_checkpoint(self.cfg.init_from)
        if overwrite and Path(ckpt.path).resolve().parent == self.run_dir.resolve():
            raise ValueError(f"init_from={self.cfg.init_from!r} is invalid with overwrite: its checkpoint is in "
                             f"run_dir={str(self.run_dir)!r}, which overwrite would delete; copy it elsewhere or "
                             "choose another run_dir")
        zero_biases = load_init_weights(self.model, ckpt, self.cfg.init_from)
        self.init_from = init_record(ckpt, self.cfg.init_from)
        if zero_biases:
            self.init_from["zero_balancing_bias"] = zero_biases

    @torch.no_grad()
    def domain_routing_counts(self, domain: str, windows: int = ESFT_WINDOWS) -> torch.Tensor:
        """(MoE layers, experts) token-expert assignments of the model, in evaluation mode, on up to
        ``windows`` windows spread evenly over ``domain``'s training text (ESFT's relevance counts)."""
        domains = list(self.data.domains)
        if domain not in domains:
            raise ValueError(f"esft_domain={domain!r} is invalid: known domains are {', '.join(domains)}")
        stream, S = self.data.train, self.model_cfg.seq_len
        lo, hi = stream.domain_ranges[domains.index(domain)].tolist()
        n = min(windows, max(0, (hi - lo - 1) // S))
        if n == 0:
            raise ValueError(f"esft_domain={domain!r} is invalid: its training text is shorter than one window of "
                             f"seq_len + 1 = {S + 1} tokens")
        starts = lo + torch.arange(n) * (hi - lo - S - 1) // max(1, n - 1)
        E = self.model_cfg.moe.num_experts
        counts = torch.zeros(len(self.model_cfg.moe_layers), 1, E, dtype=torch.long)
        was_training = self.model.training
        self.model.eval()
        for i in range(0, n, self.cfg.batch_size):
            batch = stream.windows(starts[i:i + self.cfg.batch_size], S)
            with self._autocast():
                out = self.model(batch.tokens.to(self.device))
            zeros_T = torch.zeros(batch.tokens.numel(), dtype=torch.long)
            for li, info in enumerate(out.routing):
                _add_assignments(counts[li], info, zeros_T)
        self.model.train(was_training)
        return counts[:, 0]

    def _esft_selection(self) -> list[list[int]]:
        """ESFT's experts per MoE layer, chosen by the (initial) model's routing of ``esft_domain``."""
        cfg = self.cfg
        if self.model_cfg.moe is None:
            raise ValueError("trainable='esft' is invalid: the model has no MoE layer (a dense model has no experts)")
        counts_LE = self.domain_routing_counts(cfg.esft_domain)
        selection = esft_select(counts_LE, threshold=cfg.esft_threshold, top_n=cfg.esft_top_n, top_p=cfg.esft_top_p)
        if not any(selection):
            largest = max(max(row) for row in routing_shares(counts_LE))
            raise ValueError(f"esft_threshold={cfg.esft_threshold} is invalid: it selects no expert in any layer "
                             f"(the largest share of {cfg.esft_domain!r}'s routing is {largest:.3f}); lower it")
        rule, value = next((k, v) for k, v in (("threshold", cfg.esft_threshold), ("top_n", cfg.esft_top_n),
                                               ("top_p", cfg.esft_top_p)) if v is not None)
        self._esft_record = {"domain": cfg.esft_domain, "rule": rule, "value": value,
                             "shares": [[round(x, 6) for x in row] for row in routing_shares(counts_LE)],
                             "counts": counts_LE.tolist(),
                             "counted_on": f"the initial model's routing of up to {ESFT_WINDOWS} windows spread "
                                           f"evenly over {cfg.esft_domain!r}'s training text"}
        return selection

    def _refreeze(self, run_info: dict[str, Any] | None) -> None:
        """On resume: freeze as the run did, ESFT's experts as its ``run.json`` records them."""
        selection = None
        if self.cfg.trainable == "esft":
            record = (run_info or {}).get("trainable")
            esft = record.get("esft") if isinstance(record, dict) else None
            selection = esft.get("experts") if isinstance(esft, dict) else None
            if not (isinstance(selection, list) and all(isinstance(row, list) for row in selection)):
                raise ValueError(f"{self.run_dir / RUN_FILE} does not record the experts this ESFT run trains "
                                 "(trainable.esft.experts): it cannot be resumed as it ran")
        self.freezing = freeze(self.model, self.cfg.trainable, selection)

    @property
    def trainable_record(self) -> dict[str, Any]:
        """What ``run.json`` records under ``trainable``: the group, how many values train, ESFT's choice."""
        record = self.freezing.record() if self.freezing is not None else {"group": self.cfg.trainable}
        if self._esft_record is not None:  # how the experts were chosen, beside which
            record["esft"] = {**self._esft_record, **record.get("esft", {})}
        return record

    def _check_same_data(self, accept_change: bool) -> None:
        """The data is the run's (``run.json``'s fingerprint), or ``accept_change`` records the change."""
        recorded = None if self.run_info is None else self.run_info.get("data_fingerprint")
        if self.run_info is None or self.data_fingerprint is None:
            return
        if not isinstance(recorded, dict):  # a run from before fingerprints: checked from now on
            self.run_info["data_fingerprint"] = self.data_fingerprint
            return
        if (why := fingerprint_difference(recorded, self.data_fingerprint)) is None:
            return
        what = f"data={self.cfg.data!r}" if self.cfg.data is not None else "the built-in corpus"
        if not accept_change:
            raise ValueError(f"{what} is not the data this run trained on ({self.run_dir / RUN_FILE} records its "
                             f"fingerprint): {why}; resume on that data, or go on with this data with "
                             "--accept-data-change (Trainer.resume(..., accept_data_change=True)), recorded in "
                             f"{RUN_FILE}")
        self.run_info.setdefault("data_changes", []).append(
            {"step": self.step, "change": why, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.run_info["data_fingerprint"] = self.data_fingerprint
        warnings.warn(f"{what} changed since the run started ({why}); going on from step {self.step} with it, "
                      f"as --accept-data-change asks (recorded in {RUN_FILE})", stacklevel=3)

    # --- the loop --------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _batch(self, index: int):
        b = self.data.get_batch(index)
        return (b.tokens.to(self.device, non_blocking=True), b.targets.to(self.device, non_blocking=True),
                b.domains)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics row."""
        cfg, model = self.cfg, self.model
        model.train()
        t0 = time.perf_counter()
        micro_rows = []
        for micro in range(cfg.grad_accum):
            tokens, targets, _ = self._batch(self.step * cfg.grad_accum + micro)
            with self._autocast():
                out = model(tokens, targets)
            if not torch.isfinite(out.loss):
                self._diverged(f"loss is {out.loss.item()}")
            (out.loss / cfg.grad_accum).backward()
            micro_rows.append(self._step_metrics(out))
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        return self._apply_step(_mean_rows(micro_rows), grad_norm, t0)

    def _apply_step(self, row: dict[str, Any], grad_norm: float, t0: float) -> dict[str, Any]:
        """The optimizer and schedule step, the end-of-step hooks (loss-free bias), the step count and
        time; ``row`` (the step's micro-batch metrics) gains the step's figures and is returned."""
        cfg = self.cfg
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.finish_optimizer_step()
        if self.freezing is not None:  # frozen expert slices and balancing biases back, bit for bit
            self.freezing.restore()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        self.step += 1
        self._step_times.append(elapsed)
        tokens_per_step = cfg.grad_accum * cfg.batch_size * self.model_cfg.seq_len
        row.update(step=self.step, lr=lr, grad_norm=grad_norm, step_time_s=elapsed,
                   tokens_per_s=tokens_per_step / elapsed, tokens_seen=self.step * tokens_per_step)
        return row

    def _step_metrics(self, out) -> dict[str, Any]:
        row: dict[str, Any] = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item(),
                               "aux_loss": out.aux_loss.item()}
        if not out.routing:
            return row
        row.update(step_routing_metrics(out.routing, self.model_cfg.moe_layers, self.model_cfg.moe.loss_weights))
        return row

    def _diverged(self, what: str) -> None:
        good = last_good_checkpoint(self.run_dir)  # verified: a corrupt file is never called good
        last = (f"the last good checkpoint is {good}" if good is not None else
                "no good checkpoint is left" if list_checkpoints(self.run_dir) else "no checkpoint was written yet")
        raise TrainingDiverged(f"{what} at step {self.step + 1}; training stopped, {last}")

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Validation loss per domain and the domain x expert routing counts of every MoE layer."""
        model = self.model
        model.eval()
        domains = list(self.data.domains)
        n_layers, E = len(self.model_cfg.moe_layers), (self.model_cfg.moe.num_experts if self.model_cfg.moe else 0)
        counts = torch.zeros(n_layers, len(domains), max(E, 1), dtype=torch.long)
        losses: dict[str, float] = {}
        total_loss, total_tokens = 0.0, 0
        for domain, batches in self.data.val_batches().items():
            loss_sum, n = 0.0, 0
            for batch in batches:
                tokens, targets = batch.tokens.to(self.device), batch.targets.to(self.device)
                with self._autocast():
                    out = model(tokens)
                loss_sum += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(),
                                            reduction="sum").item()
                n += targets.numel()
                domain_T = batch.domains.flatten()
                for li, info in enumerate(out.routing):
                    _add_assignments(counts[li], info, domain_T)
            if n:
                losses[domain] = loss_sum / n
            total_loss, total_tokens = total_loss + loss_sum, total_tokens + n
        model.train()
        missing = {d: getattr(self.data, "val_missing", {}).get(d, "it has no validation window")
                   for d in domains if d not in losses}
        self.last_eval = EvalResult(self.step, total_loss / total_tokens if total_tokens else None, losses, counts,
                                    domains, missing)
        return self.last_eval

    def fit(self, callback: Callable[[Trainer, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Train to ``cfg.steps``; evaluate and checkpoint on their cadence and at the end.

        ``callback(trainer, row)`` runs after every step, once the row is logged and any
        checkpoint written (live plots in notebooks use it).
        """
        cfg = self.cfg
        if self.finished:  # a finished run: nothing to train, and nothing of it is rewritten
            return self.history
        check_run_dir(self.run_dir)
        lock = RunLock(self.run_dir).acquire()  # released in the finally below, or when dropped
        self.history = self.metrics_log.truncate_after(self.step)  # a resumed run redoes later steps
        if self.run_info is None:
            self.run_info = new_run_info(self.model_cfg.to_dict(), cfg.to_dict())
            self.run_info["data_fingerprint"] = self.data_fingerprint
            self.run_info["init_from"] = self.init_from
            self.run_info["trainable"] = self.trainable_record
        self._wandb = WandbLogger(cfg.wandb_project, self.run_dir,
                                  {"model": self.model_cfg.to_dict(), "train": cfg.to_dict()},
                                  resume_id=self.run_info.get("wandb_run_id"))
        add_outputs(self.run_dir, self.run_info, RUN_FILE, self.metrics_log.path.name,
                    self.metrics_log.unreadable_path.name, *self._wandb.folders)
        update_run_info(self.run_dir, self.run_info, status="running", message=None, step=self.step,
                        wandb_run_id=self._wandb.run_id or self.run_info.get("wandb_run_id"),
                        pid=os.getpid(), host=socket.gethostname())
        _build_kernels_for(self.model)
        bar = _progress(cfg.steps, self.step, cfg.progress)
        outcome: tuple[str, str | None] = ("failed", "stopped by an error")
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                last = self.step == cfg.steps
                if self.step % cfg.eval_every == 0 or last:
                    ev = self.evaluate()
                    row["val/loss"] = ev.loss
                    row.update({f"val/{d}": v for d, v in ev.loss_per_domain.items()})
                    if ev.missing:  # not under "val/": plots take every "val/" key as a loss curve
                        row["val_missing"] = dict(ev.missing)
                self.history.append(row)
                self.metrics_log.log(row)
                self._wandb.log(row, self.step)
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save()
                if callback is not None:
                    callback(self, row)
                if bar is not None:
                    bar.update(1)
                    postfix = {"loss": f"{row['loss']:.3f}"}
                    if "max_vio" in row:
                        postfix["max_vio"] = f"{row['max_vio']:.2f}"
                    bar.set_postfix(postfix)
            outcome = ("finished", None)
        except TrainingDiverged as err:
            outcome = ("diverged", str(err))
            raise
        except KeyboardInterrupt as err:  # Ctrl-C, or a signal stop_on_signals turned into Stopped
            by = getattr(err, "signal_name", None) or "Ctrl-C (KeyboardInterrupt)"
            outcome = ("interrupted", f"stopped by {by} at step {self.step}")
            raise
        except Exception as err:
            outcome = ("failed", f"{type(err).__name__}: {err}")
            raise
        finally:
            if bar is not None:
                bar.close()
            self._wandb.finish()
            update_run_info(self.run_dir, self.run_info, status=outcome[0], message=outcome[1], step=self.step,
                            last_checkpoint=(ck.name if (ck := self.last_checkpoint()) else None))
            lock.release()
        return self.history

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self.model_cfg.to_dict(), self.cfg.to_dict(), keep=self.cfg.keep_checkpoints)

    def matmul_peak(self) -> float:
        """The matmul FLOP/s the run's throughput is measured against (MFU's denominator): this
        process's device, measured now."""
        from workbench.bench.peak import measure_matmul_peak

        return measure_matmul_peak(self.device)

    def throughput(self, skip: int = 3) -> float:
        """Median tokens per second over the steps this process ran, the first ``skip`` left out."""
        times = self._step_times[skip:] or self._step_times
        if not times:
            return float("nan")
        tokens = self.cfg.grad_accum * self.cfg.batch_size * self.model_cfg.seq_len
        return tokens / sorted(times)[len(times) // 2]


def _add_assignments(counts_DE: torch.Tensor, info, domain_T: torch.Tensor) -> None:
    """Add one MoE layer's token-expert assignments to ``counts_DE`` (domains x experts), each token
    counted under its domain id in ``domain_T``; expert choice's padded slots are left out."""
    ids_TK = info.router_output.expert_ids_TK.cpu()
    domain_TK = domain_T.unsqueeze(1).expand_as(ids_TK)
    if info.router_output.mask_TK is not None:  # expert choice pads its slots
        mask = info.router_output.mask_TK.cpu()
        ids_TK, domain_TK = ids_TK[mask], domain_TK[mask]
    counts_DE.index_put_((domain_TK.flatten(), ids_TK.flatten()), torch.ones(1, dtype=torch.long), accumulate=True)


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Average micro-batch rows key by key (element-wise for per-expert lists)."""
    if len(rows) == 1:
        return rows[0]
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        values = [r[key] for r in rows]
        if isinstance(value, list):
            out[key] = [sum(col) / len(col) for col in zip(*values, strict=True)]
        else:
            out[key] = sum(values) / len(values)
    return out


def _build_kernels_for(model: torch.nn.Module) -> None:
    """Compile the fused CPU kernels a model uses before training starts: built lazily in the first
    step, they made the progress bar's first step last a minute and its estimate read hours."""
    from workbench.kernels.cpu import FUSED_CLASSES, load_kernel

    fused = tuple(FUSED_CLASSES.values())
    if any(isinstance(m, fused) for m in model.modules()):
        load_kernel()


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
