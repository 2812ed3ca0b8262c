"""Eval task types, one module each, registered by their suite ``type:`` name (see ``base``).

    text.py             loss, next_token_accuracy   (one forward pass over packed windows for both)
    choice.py           multiple_choice             (log-likelihood of each choice, as lm-eval scores it)
    generate.py         generation                  (greedy completion vs target)
    lm_eval.py          lm_eval                     (lm-evaluation-harness tasks on the in-memory model)

Shared pieces: ``scoring`` (tokenize, batch, pad, forward), ``loglikelihood`` (continuations on a
shared context), ``inputs`` (records, fields and prompts of data evals). The scoring functions
(``loss``, ``multiple_choice``, ...) are re-exported here for use on plain lists, without a suite;
no module is named like one of them, so ``from retain.eval.tasks import multiple_choice`` is the function.
"""

from retain.eval.tasks.base import (
    EvalTaskConfig,
    SharedWork,
    TaskResult,
    eval_task_union,
    eval_types,
    get_eval_type,
    register_eval_type,
)
from retain.eval.tasks.choice import ChoiceExample, MultipleChoiceEval, multiple_choice, resolve_label
from retain.eval.tasks.generate import GenerationEval, generate_samples, generation, greedy_generate
from retain.eval.tasks.inputs import DataEval, PromptedEval
from retain.eval.tasks.lm_eval import LmEval, run_lm_eval
from retain.eval.tasks.loglikelihood import continuation_logprobs, encode_pair
from retain.eval.tasks.text import (
    LossEval,
    NextTokenAccuracyEval,
    loss,
    next_token_accuracy,
    text_windows,
    window_stats,
)

__all__ = [
    "ChoiceExample",
    "DataEval",
    "EvalTaskConfig",
    "GenerationEval",
    "LmEval",
    "LossEval",
    "MultipleChoiceEval",
    "NextTokenAccuracyEval",
    "PromptedEval",
    "SharedWork",
    "TaskResult",
    "continuation_logprobs",
    "encode_pair",
    "eval_task_union",
    "eval_types",
    "generate_samples",
    "generation",
    "get_eval_type",
    "greedy_generate",
    "loss",
    "multiple_choice",
    "next_token_accuracy",
    "register_eval_type",
    "resolve_label",
    "run_lm_eval",
    "text_windows",
    "window_stats",
]
