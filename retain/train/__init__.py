"""Training: one explicit loop (loop.py), the run recipe (run.py), atomic checkpoints (checkpoint.py)."""

from retain.train.loop import NonFiniteLossError
from retain.train.run import RunOutcome, finetune, save_model_dir

__all__ = ["NonFiniteLossError", "RunOutcome", "finetune", "save_model_dir"]
