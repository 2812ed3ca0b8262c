"""Training: one explicit loop (loop.py), the run recipe (run.py), atomic checkpoints (checkpoint.py)."""

from retain.errors import DivergenceError
from retain.models.export import save_model_dir
from retain.train.loop import NonFiniteLossError
from retain.train.run import RunOutcome, finetune

__all__ = ["DivergenceError", "NonFiniteLossError", "RunOutcome", "finetune", "save_model_dir"]
