"""minift's training loop: `Trainer` and `TrainConfig` (see trainer.py for how a step runs)."""

from .config import TrainConfig
from ..errors import NonFiniteLossError
from .interrupt import TrainingInterrupted
from .monitor import LossWarning
from .trainer import Trainer, TrainSummary

__all__ = ["Trainer", "TrainConfig", "TrainSummary", "NonFiniteLossError", "LossWarning", "TrainingInterrupted"]
