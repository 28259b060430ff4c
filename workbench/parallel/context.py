"""Who this process is in a parallel run: its rank, its expert-parallel and data-parallel groups.

A launch has ``world_size = data_parallel x expert_parallel`` processes (torchrun starts them).
The ranks are laid out expert-parallel first::

    rank = dp_rank * expert_parallel + ep_rank

so the ``expert_parallel`` ranks of one expert-parallel group are neighbours: on a multi-node
launch with ``expert_parallel`` at most the devices per node, the all-to-all (the heavy,
latency-bound traffic of every MoE layer) stays inside a node, and only the once-per-step
gradient all-reduce crosses nodes (the placement torchtitan and Megatron-LM use).

- **Expert-parallel group** (``ep_group``, ``expert_parallel`` ranks): together they hold all E
  experts, E / P each, and exchange tokens by all-to-all.
- **Expert data-parallel group** (``expert_dp_group``, ``data_parallel`` ranks): the ranks that
  hold the same experts; expert gradients are all-reduced over it (``None`` when it is one rank).
- **World**: every rank holds the same non-expert parameters and a different share of the batch;
  their gradients and the balancing statistics are all-reduced over all ranks.

The backend follows the device: gloo on CPU, NCCL on CUDA, HCCL on Ascend NPUs (torch_npu).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from workbench.parallel.comm import CommStats
from workbench.validation import check, check_int

# The process-group backend for each device type; the code above it is the same for all three.
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

# How long a collective waits for the other ranks before it fails. gloo's own default is 30 minutes,
# so a stopped or hung rank left the others waiting silently for half an hour; a step of the models
# here takes seconds, and the slowest collective (a checkpoint's gather) well under a minute.
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0

_current: ParallelContext | None = None


def _distributed():
    """``torch.distributed``, or one sentence saying why it cannot be used."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed (it was built without it); expert and data "
                           "parallelism need it: install a standard torch wheel")
    return dist


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: gloo (cpu), nccl (cuda), hccl (npu)."""
    check(device.type in BACKENDS, "device", f"expert parallelism runs on {', '.join(BACKENDS)}", str(device))
    return BACKENDS[device.type]


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its node, for ``TrainConfig.device`` = ``name``.

    Every rank of a node takes its own accelerator, number ``local_rank``: ``cuda`` and ``npu``
    (and ``auto`` where CUDA is present) mean "this rank's device". An explicit index would put
    every rank of the node on one device, which NCCL and HCCL refuse, so it is refused here.
    """
    kind, _, index = name.partition(":")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    check(kind in BACKENDS, "device", f"a parallel run needs one of {', '.join(BACKENDS)} (or auto)", name)
    if kind == "cpu":
        return torch.device("cpu")
    check(not index, "device", f"with several ranks give {kind!r} without an index: each rank takes "
          f"{kind}:LOCAL_RANK, its own device", name)
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            raise ValueError(f"device={name!r} is invalid: Ascend NPUs need torch_npu (pip install torch-npu, "
                             "matching this torch)") from None
    module = getattr(torch, kind)
    count = module.device_count() if module.is_available() else 0
    check(local_rank < count, "device", f"local rank {local_rank} needs {local_rank + 1} {kind} devices on this "
          f"node, it has {count}: start at most {count} processes per node (torchrun --nproc-per-node)", name)
    module.set_device(local_rank)  # the default device of this process: torch.device(kind) now means it
    return torch.device(kind, local_rank)


@dataclass(kw_only=True)
class ParallelConfig:
    """The degrees of a parallel launch: ``world_size = data_parallel x expert_parallel``."""

    world_size: int = 1  # processes in the launch (torchrun: nnodes x nproc-per-node)
    expert_parallel: int = 1  # P: ranks that share one copy of the experts, E / P experts each

    def __post_init__(self) -> None:
        check_int("world_size", self.world_size, 1)
        check_int("expert_parallel", self.expert_parallel, 1)
        check(self.world_size % self.expert_parallel == 0, "expert_parallel",
              f"must divide the number of ranks, world_size={self.world_size} (the other factor is the "
              "data-parallel degree)", self.expert_parallel)

    @property
    def data_parallel(self) -> int:
        """Copies of the experts (expert-parallel groups); every rank is data-parallel for the rest."""
        return self.world_size // self.expert_parallel

    def check_model(self, moe_cfg) -> None:
        """``ValueError`` naming the field when an MoE config cannot be split over ``expert_parallel`` ranks."""
        if moe_cfg is None or self.expert_parallel == 1:
            return
        P = self.expert_parallel
        check(moe_cfg.num_experts % P == 0, "num_experts", f"must be a multiple of expert_parallel={P}: every "
              f"expert-parallel rank holds the same number of experts", moe_cfg.num_experts)
        check(moe_cfg.dispatch in ("sorted", "loop"), "dispatch",
              "expert parallelism exchanges tokens dropless (the sorted dispatch, which 'loop' equals); "
              "'capacity' drops tokens and is not supported with expert_parallel > 1", moe_cfg.dispatch)
        from workbench.moe.routers import router_class

        check(not router_class(moe_cfg.router).mixes_tokens, "router",
              "soft MoE mixes a sequence's tokens into slots, which no all-to-all of tokens can split; "
              "use a token-routing router with expert_parallel > 1", moe_cfg.router)


@dataclass
class ParallelContext:
    """This process's place in the launch and the process groups it talks over (see the module doc)."""

    config: ParallelConfig
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    ep_group: object | None  # this rank's expert-parallel group (None: expert_parallel == 1)
    expert_dp_group: object | None  # the ranks that hold the same experts (None: one copy of the experts)
    stats: CommStats = field(default_factory=CommStats)  # what this rank's all-to-alls moved
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S  # how long a collective waits for the other ranks
    heartbeat: Heartbeat | None = None  # tells the other ranks this one is alive, and how far it got

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def ep_size(self) -> int:
        return self.config.expert_parallel

    @property
    def dp_size(self) -> int:
        return self.config.data_parallel

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, run.json and checkpoints."""
        return self.rank == 0

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """[lo, hi): the experts this rank holds, ``num_experts / expert_parallel`` consecutive ones."""
        per_rank = num_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank

    def collective_tensor(self, values, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A tensor for a small collective (metrics, flags) on the device the backend needs;
        HCCL takes no float64, so it gets float32 there."""
        if dtype == torch.float64 and self.backend == "hccl":
            dtype = torch.float32
        device = self.device if self.backend != "gloo" else torch.device("cpu")
        return torch.as_tensor(values, dtype=dtype, device=device)


def init_parallel(expert_parallel: int = 1, device: str = "auto", *,
                  timeout: timedelta | float | None = None) -> ParallelContext:
    """Join the launch that torchrun (or ``workbench.parallel.launch``) started and build the groups.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the
    environment (``init_method="env://"``), picks this rank's device (``rank_device``) and the
    backend for it (``BACKENDS``), and makes the context current (``current_context``).
    Every rank must call it, with the same ``expert_parallel``.

    ``timeout`` (a ``timedelta`` or seconds; default ``DEFAULT_COLLECTIVE_TIMEOUT_S``): how long a
    collective waits for the other ranks before it raises, so that a stopped rank cannot leave the
    others waiting for gloo's 30 minutes; every rank also starts a ``Heartbeat``, by which the
    ranks that wait name the one that did not answer.
    """
    global _current
    dist = _distributed()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"expert_parallel={expert_parallel} needs a parallel launch, and {', '.join(missing)} "
                         "is not set: start the processes with torchrun, e.g. torchrun --nproc-per-node "
                         f"{max(2, expert_parallel)} -m workbench train --expert-parallel {expert_parallel} ...")
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    config = ParallelConfig(world_size=world_size, expert_parallel=expert_parallel)
    dev = rank_device(device, local_rank)
    backend = backend_for(dev)
    if timeout is None:
        timeout = DEFAULT_COLLECTIVE_TIMEOUT_S
    timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    check(timeout_s > 0, "collective_timeout", "must be a number of seconds > 0", timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    P, D = config.expert_parallel, config.data_parallel
    ep_group = expert_dp_group = None
    # new_group is collective: every rank creates every group, in the same order, and keeps its own. A
    # group does not take the default group's timeout: it is given the same one.
    wait = timedelta(seconds=timeout_s)
    for d in range(D):
        group = dist.new_group([d * P + i for i in range(P)], timeout=wait) if P > 1 else None
        if rank // P == d:
            ep_group = group
    for i in range(P):
        group = dist.new_group([d * P + i for d in range(D)], timeout=wait) if D > 1 else None
        if rank % P == i:
            expert_dp_group = group
    _current = ParallelContext(config, rank, local_rank, dev, backend, ep_group, expert_dp_group,
                               timeout_s=timeout_s, heartbeat=Heartbeat.start(rank, world_size, timeout_s))
    return _current


def current_context() -> ParallelContext:
    """The context ``init_parallel`` made in this process; ``RuntimeError`` when there is none."""
    if _current is None:
        raise RuntimeError("no parallel context in this process: call workbench.parallel.init_parallel() on every "
                           "rank first (the CLI does it for --expert-parallel, or when launched by torchrun)")
    return _current


def shutdown() -> None:
    """Leave the launch: destroy the process groups (call once, on every rank, at the end)."""
    global _current
    import torch.distributed as dist

    if _current is not None and _current.heartbeat is not None:
        _current.heartbeat.stop()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = None


class Heartbeat:
    """A thread that writes this rank's time and step to the launch's key-value store (the
    rendezvous store at ``MASTER_ADDR:MASTER_PORT``) every ``interval_s`` seconds.

    When a collective times out, the waiting ranks read every rank's entry (``silent_ranks``): a
    rank whose beat is old is stopped (SIGSTOP), hung in native code or gone; failing that, a rank
    whose step is behind the others' is the one the collective waited for. A rank that sleeps in
    Python keeps beating, so the step is what names it.
    """

    PREFIX = "workbench/heartbeat/"

    def __init__(self, store, rank: int, world_size: int, interval_s: float):
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self.step = 0  # set by the trainer at each step
        self._lock = threading.Lock()  # one store connection, two threads
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workbench-heartbeat", daemon=True)

    @classmethod
    def start(cls, rank: int, world_size: int, timeout_s: float) -> Heartbeat | None:
        """Connect to the rendezvous store and start beating; None where the store cannot be reached."""
        import torch.distributed as dist

        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timedelta(seconds=min(30.0, timeout_s)))
        except (RuntimeError, KeyError, ValueError):  # no store to beat into: timeouts still name no rank
            return None
        beat = cls(store, rank, world_size, interval_s=max(0.2, min(5.0, timeout_s / 6)))
        beat._beat()
        beat._thread.start()
        return beat

    def _beat(self) -> None:
        with self._lock:
            self.store.set(f"{self.PREFIX}{self.rank}", f"{time.time()} {self.step}")

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self._beat()
            except RuntimeError:  # the store went away: the launch is ending
                return

    def stop(self) -> None:
        self._stopped.set()

    def silent_ranks(self) -> list[int]:
        """The ranks that did not answer (see the class doc), in rank order; [] when none can be told."""
        now, beats = time.time(), {}
        for r in range(self.world_size):
            try:
                with self._lock:
                    if not self.store.check([f"{self.PREFIX}{r}"]):  # get() would wait for it to appear
                        raise ValueError("no beat yet")
                    when, step = self.store.get(f"{self.PREFIX}{r}").decode().split()
                beats[r] = (float(when), int(step))
            except (RuntimeError, ValueError):  # no beat at all: gone before the first one
                beats[r] = (0.0, -1)
        stale = [r for r, (when, _) in beats.items() if now - when > 3 * self.interval_s]
        if stale:
            return stale
        furthest = max(step for _, step in beats.values())
        return [r for r, (_, step) in beats.items() if step < furthest]
