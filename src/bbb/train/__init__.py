"""Training engine: the loop, checkpoints and seeding."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import StopTraining, Trainer, TrainingDivergedError, evaluate, seed_everything

__all__ = [
    "CheckpointError",
    "StopTraining",
    "Trainer",
    "TrainingDivergedError",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
]
