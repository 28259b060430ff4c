"""Run a function on N local processes joined by gloo on 127.0.0.1: tests, benchmarks, notebooks.

    results = run_local(check_layer, nprocs=2, args=(seed,), expert_parallel=2)

Each process gets the environment torchrun would give it (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), calls ``init_parallel``,
runs ``fn(ctx, *args)`` and hands its return value back; ``run_local`` returns them in rank
order. A rank that raises stops the others and the error is re-raised here with the rank's
traceback; a launch that outlives ``timeout_s`` is killed (a collective that never completes
would otherwise wait for gloo's 30-minute default). Training launches use torchrun itself (README).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], args: tuple, nprocs: int, port: int, expert_parallel: int,
            device: str, threads: int, env: dict[str, str], out_dir: str, collective_timeout_s: float) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    from workbench.parallel.context import init_parallel, shutdown

    ctx = init_parallel(expert_parallel, device, timeout=timedelta(seconds=collective_timeout_s))
    try:
        result = fn(ctx, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown()


def run_local(fn: Callable[..., Any], nprocs: int = 2, args: tuple = (), *, expert_parallel: int = 1,
              device: str = "cpu", threads: int = 1, env: dict[str, str] | None = None,
              timeout_s: float = 600.0, collective_timeout_s: float | None = None) -> list[Any]:
    """``fn(ctx, *args)`` on ``nprocs`` spawned processes; their return values, in rank order.

    ``fn`` must be importable by name (a module-level function) and its return value picklable
    (``torch.save``). ``threads`` sets each process's torch intra-op threads (0 leaves torch's default).
    ``collective_timeout_s``: how long a collective waits for the other ranks (default: ``timeout_s``,
    at most 300 s).
    """
    import torch.multiprocessing as mp

    env = dict(env or {})
    if "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on how the host name resolves
    with tempfile.TemporaryDirectory(prefix="workbench-launch-") as out_dir:
        context = mp.start_processes(
            _worker, args=(fn, args, nprocs, free_port(), expert_parallel, device, threads, env, out_dir,
                           collective_timeout_s or min(timeout_s, 300.0)),
            nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=0.5):  # raises (and stops the others) when a rank failed
            if time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"the {nprocs}-process launch of {fn.__name__} did not finish in {timeout_s:.0f} s")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]
