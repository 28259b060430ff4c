"""``workbench upcycle``: a dense run becomes an MoE checkpoint that training can start from.

    workbench train --dense --run-dir runs/dense
    workbench upcycle --from runs/dense --to runs/upcycled --method drop --drop-ratio 0.5
    workbench train --init-from runs/upcycled --run-dir runs/moe

The MoE model is ``--preset`` with the MoE and model flags on top (the same flags ``train``
has); its shape must be the dense run's. Fields the method fixes and that are not given come from
the dense run (``workbench.upcycle.upcycled_config``): the expert hidden size (copy, drop: the dense
hidden size H; granular: H / num_experts) and the shared expert. Every refused value (a dense run of
another shape, a drop ratio outside [0, 1], an unknown method, a source that is not dense) is one
line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from workbench.cli.common import add_config_flags, fail, given, one_line, say

_DESCRIPTION = """\
Upcycle a dense run (workbench train --dense) into an MoE checkpoint at step 0 and write it to
--to: a .safetensors file, or a folder (written as FOLDER/ckpt-00000000.safetensors). Methods:
copy (every expert a copy of the dense FFN; Komatsuzaki et al. 2022), granular (the dense FFN's
hidden units split across the experts; fine-grained experts as in Qwen1.5-MoE), drop (copy, then
--drop-ratio of each expert's hidden units re-initialised; Nakamura et al. 2025, Drop-Upcycling).
--shared-expert keeps one shared expert built from the dense FFN. The command says whether the
MoE model computes the dense model's function at step 0, and why.

Exit status: 0 written, 2 a bad value or an unusable source (one line on stderr)."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``upcycle``; its parser's ``run`` default runs it."""
    from workbench.config import PRESETS, ModelConfig, MoEConfig, preset
    from workbench.upcycle import METHODS, ROUTER_INITS

    p = sub.add_parser("upcycle", help="a dense run becomes an MoE checkpoint (sparse upcycling)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", type=Path, required=True, metavar="DENSE_RUN_OR_FILE",
                   help="a dense run directory (its newest usable checkpoint) or checkpoint file")
    p.add_argument("--to", dest="out", type=Path, required=True, metavar="RUN_DIR_OR_FILE",
                   help="where to write: a .safetensors file, or a folder (FOLDER/ckpt-00000000.safetensors)")
    p.add_argument("--preset", default="tiny", help=f"the MoE model's preset; one of: {', '.join(PRESETS)} "
                   "(default: tiny)")
    # not argparse choices: an unknown method is refused by workbench.upcycle, naming the known ones
    p.add_argument("--method", default="copy", help=f"one of: {', '.join(METHODS)} (default: copy)")
    p.add_argument("--drop-ratio", type=float, default=0.5, metavar="R",
                   help="--method drop: the fraction of each expert's hidden units re-initialised, in [0, 1] "
                        "(default: 0.5, the paper's)")
    p.add_argument("--router-init", default="small", help=f"one of: {', '.join(ROUTER_INITS)} (default: small, "
                   "N(0, 1e-3^2); zero: uniform gates and tied top-k at step 0)")
    p.add_argument("--noise", type=float, default=0.0, metavar="S",
                   help="add S x std(W) x N(0, 1) to every routed expert matrix (default: 0)")
    p.add_argument("--shared-expert", action="store_true", help="keep one shared expert built from the dense FFN")
    p.add_argument("--seed", type=int, default=0, help="seeds the router, the re-initialised units and the noise "
                   "(default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    base = preset("tiny")
    for cls, defaults, title in ((ModelConfig, base, "model (ModelConfig)"),
                                 (MoEConfig, base.moe, "MoE layers (MoEConfig)")):
        add_config_flags(p, cls, defaults, title, skip=("moe",), allowed=getattr(cls, "ALLOWED", {}))
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    prog = "workbench upcycle"
    from workbench.config import ModelConfig, MoEConfig, preset
    from workbench.train import CheckpointError
    from workbench.upcycle import read_dense, read_upcycle_metadata, upcycle_checkpoint, upcycled_config

    try:
        dense_cfg, _, dense_file, _ = read_dense(args.source)
    except (ValueError, OSError) as err:
        return fail(prog, f"--from={args.source} is invalid: {one_line(err)}")
    try:
        moe_flags, model_flags = given(args, MoEConfig), given(args, ModelConfig)
        cfg = preset(args.preset, **moe_flags)
        cfg = ModelConfig(**{**dataclasses.asdict(cfg), **model_flags})
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            if getattr(cfg, name) != getattr(dense_cfg, name):
                raise ValueError(f"{name}={getattr(cfg, name)} (--preset {args.preset}) does not match the dense "
                                 f"checkpoint {dense_file}, which has {name}={getattr(dense_cfg, name)}")
        asked = cfg
        cfg = upcycled_config(dense_cfg, cfg, args.method, shared_expert=args.shared_expert,
                              given=set(moe_flags) | set(model_flags))
        path = upcycle_checkpoint(args.source, args.out, cfg, overwrite=args.overwrite, method=args.method,
                                  router_init=args.router_init, noise=args.noise, drop_ratio=args.drop_ratio,
                                  shared_expert=args.shared_expert, seed=args.seed)
    except (ValueError, TypeError, CheckpointError, OSError) as err:
        return fail(prog, err)
    info = read_upcycle_metadata(path) or {}
    m = cfg.moe
    say(f"wrote {path}: {args.method} upcycling of {dense_file} (step {info.get('source', {}).get('step')}) into "
        f"{m.num_experts} experts x {m.expert_hidden} hidden (top-{m.top_k}, router {m.router}"
        f"{', 1 shared expert' if args.shared_expert else ''}), W2 scale {info.get('expert_scale', 1.0):g}")
    say(f"step 0: {info.get('step0', '?')}")
    # the sizes taken from the dense model are not the preset's: a run that starts from this file needs them
    sizes = [(name, getattr(cfg.moe, name)) for name in (f.name for f in dataclasses.fields(MoEConfig))
             if getattr(cfg.moe, name) != getattr(asked.moe, name)]
    sizes += [(name, getattr(cfg, name)) for name in (f.name for f in dataclasses.fields(ModelConfig))
              if name != "moe" and getattr(cfg, name) != getattr(asked, name)]
    flags = "".join(f" --{name.replace('_', '-')} {value}" for name, value in sizes)
    say(f"train from it: workbench train --preset {args.preset}{flags} --init-from {path} --run-dir RUN_DIR")
    return 0
