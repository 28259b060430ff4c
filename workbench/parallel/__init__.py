"""Expert and data parallelism on torch.distributed: experts split over ranks, tokens by all-to-all.

    ctx = init_parallel(expert_parallel=2)               # on every rank of a torchrun launch
    trainer = ExpertParallelTrainer(preset("small"), TrainConfig(grad_accum=2))
    trainer.fit()                                        # rank 0 writes the run directory

- ``context``: the launch (ranks, expert-parallel and data-parallel groups, backend per device)
- ``comm``: the all-to-all with autograd, and what it moved (``CommStats``)
- ``layer``: ``parallelize_layer`` / ``parallelize_model``: an ``MoELayer`` given sharded experts, an
  all-to-all dispatch and an all-reduce for its statistics
- ``grads``: gradient all-reduce per parameter kind, clipping over the whole model
- ``state``: checkpoints in the single-process layout, whatever the number of ranks
- ``trainer``: ``ExpertParallelTrainer``
- ``launch``: ``run_local``, N gloo processes on this machine (tests, benchmarks, notebooks)
"""

from workbench.parallel.comm import CommStats, all_to_all, exchange, exchange_counts
from workbench.parallel.context import (
    BACKENDS,
    ParallelConfig,
    ParallelContext,
    backend_for,
    current_context,
    init_parallel,
    shutdown,
)
from workbench.parallel.launch import run_local
from workbench.parallel.layer import ExpertParallelDispatch, parallelize_layer, parallelize_model, sharded_parameters

__all__ = [
    "BACKENDS", "CommStats", "ExpertParallelDispatch", "ExpertParallelTrainer", "ParallelConfig", "ParallelContext",
    "all_to_all", "backend_for", "current_context", "exchange", "exchange_counts", "init_parallel",
    "parallelize_layer", "parallelize_model", "run_local", "sharded_parameters", "shutdown",
]


def __getattr__(name: str):
    # the trainer pulls in the training stack (data, checkpoints); import it only when asked for
    if name == "ExpertParallelTrainer":
        from workbench.parallel.trainer import ExpertParallelTrainer

        return ExpertParallelTrainer
    raise AttributeError(f"module 'workbench.parallel' has no attribute {name!r}")
