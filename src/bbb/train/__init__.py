"""Training engine: the loop, checkpoints and seeding."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import Trainer, TrainingDivergedError, evaluate, seed_everything

__all__ = [
    "CheckpointError",
    "Trainer",
    "TrainingDivergedError",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
]
