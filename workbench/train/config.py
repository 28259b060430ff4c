"""Training configuration and the named load-balancing recipes."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from workbench.validation import check as _check
from workbench.validation import check_int, check_real

AUTOCAST = ("auto", "bf16", "none")
DEVICES = ("auto", "cpu", "cuda[:N]", "npu[:N]", "mps")
# Which parameters a run trains (``workbench.train.freeze`` defines each group by parameter name).
TRAINABLE = ("all", "non_router", "non_moe", "routers", "experts", "attention", "esft")
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
    # validation still reports every domain, so that forgetting the others is measured
    train_domains: tuple[str, ...] | None = None  # domains training batches draw from, by their text's size (none: all)

    # Starting from another run's weights, and what trains (workbench.train.freeze).
    init_from: str | None = None  # a run directory or checkpoint file: its weights start this run (not --resume)
    # the flag refuses other names as it parses them (metadata "choices"); __post_init__ refuses them from Python
    trainable: str = field(default="all", metadata={"choices": TRAINABLE})  # what trains; the rest is frozen
    esft_domain: str | None = None  # trainable=esft: the domain whose routing chooses each layer's trained experts
    esft_threshold: float | None = None  # esft: train the experts whose share of the domain's routing is above this
    esft_top_n: int | None = None  # esft: train each layer's n experts with the largest share of the domain's routing
    esft_top_p: float | None = None  # esft: train the fewest experts whose shares add up to at least this (ESFT's rule)

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
        self._check_train_domains()
        self._check_finetuning()

    def _check_train_domains(self) -> None:
        """A non-empty list of distinct names (whether the data has them is checked when it is built)."""
        if self.train_domains is None:
            return
        if isinstance(self.train_domains, str):  # "code,prose" from Python: split as the flag does
            self.train_domains = tuple(d for d in self.train_domains.split(",") if d)
        domains = self.train_domains
        _check(isinstance(domains, (list, tuple)) and all(isinstance(d, str) and d for d in domains), "train_domains",
               "must be a list of domain names (e.g. code,prose,records), or None for every domain", domains)
        _check(len(domains) > 0, "train_domains", "must name at least one domain (None: every domain)", domains)
        _check(len(set(domains)) == len(domains), "train_domains", "must not repeat a domain", domains)
        self.train_domains = tuple(domains)  # JSON gives back a list

    def _check_finetuning(self) -> None:
        """``trainable`` is a known group; the ESFT fields come with ``trainable=esft`` and only with it."""
        _check(self.trainable in TRAINABLE, "trainable", "allowed values are " + ", ".join(TRAINABLE),
               self.trainable)
        if self.init_from is not None:
            _check(isinstance(self.init_from, str) and self.init_from.strip() != "", "init_from",
                   "give a run directory or a checkpoint file (ckpt-<step>.safetensors), or leave it unset (None)",
                   self.init_from)
        rules = {name: getattr(self, name) for name in ("esft_threshold", "esft_top_n", "esft_top_p")}
        chosen = [name for name, value in rules.items() if value is not None]
        if self.trainable != "esft":
            given = chosen + (["esft_domain"] if self.esft_domain is not None else [])
            if given:
                _check(False, given[0], "applies only with trainable=esft (expert-specialised fine-tuning); this "
                       f"run has trainable={self.trainable!r}", getattr(self, given[0]))
            return
        _check(isinstance(self.esft_domain, str) and self.esft_domain != "", "esft_domain",
               "trainable=esft needs the domain whose routing chooses the experts (e.g. esft_domain='code')",
               self.esft_domain)
        _check(self.init_from is not None, "init_from", "trainable=esft needs the run or checkpoint to fine-tune: "
               "ESFT chooses the experts by a trained model's routing of esft_domain", self.init_from)
        _check(len(chosen) == 1, "trainable", "esft needs exactly one rule to choose the experts: esft_threshold, "
               f"esft_top_n or esft_top_p (given: {', '.join(chosen) or 'none'})", self.trainable)
        if self.esft_threshold is not None:
            check_real("esft_threshold", self.esft_threshold, 0)
            _check(self.esft_threshold <= 1, "esft_threshold", "must be a fraction in [0, 1]", self.esft_threshold)
        if self.esft_top_p is not None:
            check_real("esft_top_p", self.esft_top_p, 0, above=True)
            _check(self.esft_top_p <= 1, "esft_top_p", "must be a fraction in (0, 1]", self.esft_top_p)
        if self.esft_top_n is not None:
            check_int("esft_top_n", self.esft_top_n, 1)

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
