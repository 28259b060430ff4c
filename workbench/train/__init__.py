"""Training: the trainer, its configuration, checkpoints and metric loggers."""

from workbench.train.checkpoint import CheckpointError, load_checkpoint, load_latest_checkpoint
from workbench.train.config import BALANCE_RECIPES, TrainConfig, balance_recipe
from workbench.train.trainer import EvalResult, Trainer, TrainingDiverged

__all__ = [
    "BALANCE_RECIPES", "CheckpointError", "EvalResult", "TrainConfig", "Trainer", "TrainingDiverged",
    "balance_recipe", "load_checkpoint", "load_latest_checkpoint",
]
