"""Will it fit? A lower bound of the memory a command needs, checked before anything is allocated.

A value such as ``--vocab-size 100000000000`` passes every config check (it is a positive
integer) and then ends in the allocator's traceback, or in the kernel's OOM killer. The bounds
here count only the tensors that must exist at once (weights, gradients, optimizer state, one
batch's largest activations), so a refusal is never wrong: what is refused could not have run.
What passes may still run out of memory later, on activations this bound leaves out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from workbench.validation import check

GIB = 2**30


def _meminfo(key: str) -> int | None:
    """A ``/proc/meminfo`` entry in bytes (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (a container's), or None when there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # cgroup v1 writes a huge number for "no limit"
            return int(text)
    return None


def memory_limit(device: torch.device) -> tuple[int, str] | None:
    """The most memory a process can have on ``device`` (bytes) and how to say it; None: unknown.

    CPU: physical memory plus swap, or the container's limit when lower. CUDA: the device's total
    memory. Other devices: unknown (nothing is refused there)."""
    if device.type == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        total = ram + (_meminfo("SwapTotal") or 0)
        limit = _cgroup_limit()
        if limit is not None and limit < total:
            return limit, f"this container's memory limit of {limit / GIB:,.1f} GiB"
        return total, f"this machine's {total / GIB:,.1f} GiB of memory (RAM and swap)"
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        return total, f"{torch.cuda.get_device_name(index)}'s {total / GIB:,.1f} GiB"
    return None


def check_fits(field_name: str, value: Any, needed: int, device: torch.device, what: str) -> None:
    """``ValueError`` naming ``field_name`` when ``needed`` bytes (a lower bound of ``what``) exceed
    what ``device`` can ever hold."""
    limit = memory_limit(device)
    if limit is None:
        return
    total, described = limit
    check(needed <= total, field_name, f"{what} needs at least {needed / GIB:,.1f} GiB, more than {described}",
          value)


def training_bytes(model_cfg: Any, train_cfg: Any) -> int:
    """A lower bound of the memory training needs: the fp32 weights, their gradients and AdamW's two
    moments (16 bytes a parameter), and one micro-batch's logits and their gradient (8 bytes each)."""
    logits = train_cfg.batch_size * model_cfg.seq_len * model_cfg.vocab_size
    return 16 * model_cfg.num_params() + 8 * logits


def check_training_fits(model_cfg: Any, train_cfg: Any, device: torch.device, shares: int = 1) -> None:
    """Refuse a model and batch that cannot fit on ``device``, naming the largest of the fields that
    size them (the vocabulary, the width, the depth, the experts, the batch). ``shares``: the devices
    the run is spread over (a parallel launch), each holding at least its share."""
    needed = -(-training_bytes(model_cfg, train_cfg) // shares)
    limit = memory_limit(device)
    if limit is None or needed <= limit[0]:
        return
    sizes = {"vocab_size": model_cfg.vocab_size, "d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers,
             "dense_hidden": model_cfg.dense_hidden, "seq_len": model_cfg.seq_len,
             "batch_size": train_cfg.batch_size}
    if model_cfg.moe is not None:
        sizes.update(num_experts=model_cfg.moe.num_experts, expert_hidden=model_cfg.moe.expert_hidden)
    largest = max(sizes, key=sizes.__getitem__)
    shown = ", ".join(f"{k}={v:,}" for k, v in sizes.items() if k != largest)
    over = f" over {shares} devices" if shares > 1 else ""
    check_fits(largest, sizes[largest], needed, device,
               f"training this model{over} ({model_cfg.num_params():,} parameters; {shown})")


def layer_bench_bytes(cfg: Any) -> int:
    """A lower bound of ``bench layer``'s memory: each assignment's three expert hidden activations
    (gate, up, their product) and the layer's input and output with their gradients."""
    item = torch.tensor([], dtype=getattr(torch, cfg.dtype)).element_size()
    return item * (3 * cfg.tokens * cfg.top_k * cfg.expert_hidden + 4 * cfg.tokens * cfg.d_model)
