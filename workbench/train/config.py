"""Training configuration and the named load-balancing recipes."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from workbench.validation import check as _check
from workbench.validation import check_int, check_real

AUTOCAST = ("auto", "bf16", "none")
DEVICES = ("auto", "cpu", "cuda[:N]", "npu[:N]", "mps")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def _device_syntax_ok(name: Any) -> bool:
    """``auto``, ``cpu``, ``mps``, or ``cuda`` / ``npu`` with an optional ``:N`` (N >= 0).

    Only the spelling: whether this machine's torch can use the device is checked when a
    ``Trainer`` is built (``workbench.train.trainer.resolve_device``), so a config recorded on a
    GPU machine still loads on a laptop.
    """
    if not isinstance(name, str):
        return False
    kind, sep, index = name.partition(":")
    if kind in ("auto", "cpu", "mps"):
        return not sep
    return kind in ("cuda", "npu") and (not sep or (index.isdigit() and index.isascii()))


@dataclass(kw_only=True)
class TrainConfig:
    """One training run: optimisation, evaluation, checkpoints and data."""

    # What the fields that name one of a set allow, as each flag's --help lists it (workbench.cli);
    # __post_init__ checks them (the device by its spelling: cuda:1 is one of cuda[:N]).
    ALLOWED: ClassVar[dict[str, Collection[str]]] = {"autocast": AUTOCAST, "device": DEVICES}

    steps: int = 300  # optimizer steps in the whole run
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate (AdamW), reached after the warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # matrices only: not on norms, biases or the router's balancing bias
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    seed: int = 0  # seeds the initialisation and the order of training batches
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda[:N], npu[:N] or mps
    autocast: str = "auto"  # auto (bf16 on CUDA, none elsewhere), bf16 or none

    eval_every: int = 100  # steps between validations; also evaluated at the last step
    eval_windows: int = 16  # validation windows per domain
    checkpoint_every: int = 100  # steps between checkpoints; also saved at the last step
    keep_checkpoints: int = 2  # newest checkpoints kept in run_dir

    data: str | None = None  # a text file or a folder of domain subfolders; None: built-in corpus
    val_fraction: float = 0.05  # share of documents held out for validation
    max_bytes_per_domain: int = 2_000_000  # built-in corpus size per domain

    run_dir: str = "runs/latest"  # where checkpoints, metrics.jsonl, report.png and summary.json go
    wandb_project: str = "moe-workbench"  # wandb project (tracking follows WANDB_MODE)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_windows", "checkpoint_every",
                     "keep_checkpoints", "max_bytes_per_domain"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        # finite numbers: an infinite or NaN learning rate or weight decay passes a plain comparison and
        # then stops the run with "loss is nan at step 1", naming no field
        check_real("lr", self.lr, 0, above=True)
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        check_real("weight_decay", self.weight_decay, 0)
        # torch.manual_seed takes a 64-bit seed; a larger one fails deep inside the trainer
        check_int("seed", self.seed, SEED_RANGE[0])
        _check(self.seed <= SEED_RANGE[1], "seed", f"must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}",
               self.seed)
        _check(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)", self.beta2)
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)", self.grad_clip)
        _check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)", self.val_fraction)
        _check(self.autocast in AUTOCAST, "autocast", "allowed values are " + ", ".join(AUTOCAST), self.autocast)
        _check(_device_syntax_ok(self.device), "device", "allowed values are " + ", ".join(DEVICES), self.device)
        if self.data is not None:
            _check(isinstance(self.data, str) and self.data.strip() != "", "data",
                   "give a text file or a folder of domain subfolders, or leave it unset (None) for the "
                   "built-in corpus", self.data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Named recipes for --balance: which MoEConfig weights to set. Explicit flags override them.
BALANCE_RECIPES: dict[str, dict[str, Any]] = {
    # Switch Transformer / GShard auxiliary loss (Fedus et al. 2021 use 1e-2)
    "aux_loss": {"aux_loss_weight": 1e-2, "seq_aux_loss_weight": 0.0, "bias_update_rate": 0.0},
    # DeepSeek-V3's sequence-wise loss alone
    "seq_aux": {"aux_loss_weight": 0.0, "seq_aux_loss_weight": 1e-2, "bias_update_rate": 0.0},
    # Auxiliary-loss-free balancing (Wang et al. 2024 use u = 1e-3)
    "loss_free": {"aux_loss_weight": 0.0, "seq_aux_loss_weight": 0.0, "bias_update_rate": 1e-3},
    # DeepSeek-V3: loss-free bias plus a tiny sequence-wise loss (alpha = 1e-4)
    "deepseek_v3": {"aux_loss_weight": 0.0, "seq_aux_loss_weight": 1e-4, "bias_update_rate": 1e-3},
    "none": {"aux_loss_weight": 0.0, "seq_aux_loss_weight": 0.0, "bias_update_rate": 0.0},
}


def balance_recipe(name: str) -> dict[str, Any]:
    if name not in BALANCE_RECIPES:
        raise ValueError(f"balance={name!r} is invalid: allowed values are {', '.join(BALANCE_RECIPES)}")
    return dict(BALANCE_RECIPES[name])
