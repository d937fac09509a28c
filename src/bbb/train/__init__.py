"""Training engine: the loop, checkpoints and seeding."""

from .checkpoint import CheckpointError, RunLockedError, load_checkpoint, save_checkpoint
from .trainer import (
    NonFinitePredictionError,
    StopTraining,
    Trainer,
    TrainingDivergedError,
    evaluate,
    seed_everything,
)

__all__ = [
    "CheckpointError",
    "NonFinitePredictionError",
    "RunLockedError",
    "StopTraining",
    "Trainer",
    "TrainingDivergedError",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
]
