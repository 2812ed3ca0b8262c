"""retain's hooks inside ``transformers.Trainer`` and TRL's ``SFTTrainer``.

``retain_trainer(TrainerClass)`` returns a subclass that takes ``retain=session`` and places each hook where
retain's own loop has it:

- ``transform_batch``: in ``get_batch_samples``, once per micro-batch in order, before any forward
  (``ctx.micro_batch`` names the micro-batch being built, then the one being scored in ``compute_loss``,
  as in retain's loop: lwf and fip keep their pool rows per micro-batch); the label count the Trainer normalizes by (``num_items_in_batch``) is taken again on the transformed batches,
  so masking (stm) and mixing (replay) change the normalization as they change the loss.
- forward and ``extra_losses``: in ``compute_loss``, which runs the model on ``input_ids``/
  ``attention_mask``/``labels`` (the logits strategies need; TRL's fused head does not build them) and
  adds the named terms. Evaluation inside the Trainer keeps the parent's ``compute_loss``.
- ``after_backward``: before gradient clipping (``_clip_grad_norm``), as in retain's loop, or at
  ``on_pre_optimizer_step`` when clipping is off.
- ``after_step``: ``on_step_end``, after the optimizer and scheduler stepped and gradients were zeroed.
- strategy state: ``on_save`` writes ``checkpoint-N/retain/``; resuming restores it before ``train()``.

Loss scale. The Trainer normalizes the task loss by the label tokens of the whole accumulated step (all
processes when ``average_tokens_across_devices``) and does not divide it again. retain's terms are
per-micro-batch means, so they are divided by the number of micro-batches in the step: a step's
gradient is then that of ``task mean + sum(terms)``, as in retain's loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from retain.data import count_scored_tokens
from retain.data.replay_buffer import REPLAYED
from retain.errors import ConfigError
from retain.models.adapters import is_peft_model
from retain.strategies.base import Strategy
from retain.strategies.flow import SAMPLE_WEIGHT

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def scaled_loss(
    task_mean: torch.Tensor,
    terms: dict[str, torch.Tensor],
    *,
    local_items: torch.Tensor | int,
    num_items_in_batch: torch.Tensor | int | None,
    accumulation_steps: int,
    world: int,
    average_across_devices: bool,
) -> torch.Tensor:
    """One micro-batch's loss as the Trainer backpropagates it (already scaled for gradient accumulation).

    With ``num_items_in_batch`` the task part is ``sum of token losses / num_items_in_batch`` (times the
    process count when the count is global, since DDP then averages the gradients); without it, the
    micro-batch mean divided by the accumulation steps. Each term is divided by the accumulation steps.
    """
    if num_items_in_batch is not None:
        task = task_mean * local_items / num_items_in_batch
        if average_across_devices and world > 1:
            task = task * world
    else:
        task = task_mean / accumulation_steps
    if not terms:
        return task
    return task + sum(terms.values()) / accumulation_steps


def _overrides(strategy: Strategy, hook: str) -> bool:
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)


class RetainTrainerMixin:
    """Mix in before a Trainer class (``retain_trainer`` does it); pass ``retain=session`` to the constructor."""

    loss_is_scaled_for_ga = True  # compute_loss returns the accumulation-scaled loss (see scaled_loss)

    def __init__(self, *args: Any, retain: Any = None, **kwargs: Any) -> None:
        if retain is None:
            raise ConfigError("a retain Trainer needs retain=session (a retain.integrations.RetainSession)")
        super().__init__(*args, **kwargs)
        self.retain = retain
        self._retain_transforms = any(_overrides(s, "transform_batch") for s in retain.strategies)
        self._retain_terms: dict[str, torch.Tensor] = {}
        self._retain_steps = 0
        self._retain_after_backward_done = False
        self._retain_micro = 0  # the micro-batch of the step compute_loss scores next
        self.add_callback(RetainCallback(self))
        retain.bind(self)

    # -- transform_batch ------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._retain_micro = 0  # a new optimizer step: compute_loss scores its micro-batches in this order
        if not self._retain_transforms:
            return batches, num_items
        ctx = self.retain.ctx
        transformed = []
        for micro, batch in enumerate(batches):
            ctx.micro_batch = micro
            plain = _retain_batch(batch)
            plain = {k: v.cpu() for k, v in plain.items()}  # transforms build rows on the host, as in retain's loop
            transformed.append(self.retain.hybrid.transform_batch(plain, ctx))
        if num_items is not None:
            num_items = self._get_num_items_in_batch(transformed, device)
        return transformed, num_items

    # -- loss -----------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        batch = _retain_batch(inputs)
        self.retain.ctx.micro_batch, self._retain_micro = self._retain_micro, self._retain_micro + 1
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        terms = self.retain.hybrid.extra_losses(outputs, batch, self.retain.ctx)
        steps = int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)
        loss = scaled_loss(
            outputs.loss, terms,
            local_items=count_scored_tokens(batch["labels"]) if num_items_in_batch is not None else 0,
            num_items_in_batch=num_items_in_batch,
            accumulation_steps=steps,
            world=self.accelerator.num_processes,
            average_across_devices=bool(self.args.average_tokens_across_devices),
        )
        self._record_terms(outputs.loss, terms, steps)
        return (loss, outputs) if return_outputs else loss

    def _record_terms(self, task_mean: torch.Tensor, terms: dict[str, torch.Tensor], steps: int) -> None:
        """Detached on-device sums for the log (no host sync here): per step, means over micro-batches."""
        for key, value in {"task_loss": task_mean, **terms}.items():
            value = value.detach().float().reshape(()) / steps
            self._retain_terms[key] = self._retain_terms[key] + value if key in self._retain_terms else value

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._retain_steps:
            for key, value in self._retain_terms.items():
                logs[f"retain/{key}"] = float(value) / self._retain_steps
            logs.update({f"retain/{k}": v for k, v in self.retain.ctx.metrics.items()})
            self.retain.ctx.metrics.clear()
            self._retain_terms, self._retain_steps = {}, 0
        super().log(logs, *args, **kwargs)

    # -- after_backward before clipping ---------------------------------------------------------

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        self._retain_after_backward(model)
        return super()._clip_grad_norm(model)

    def _retain_after_backward(self, model: nn.Module) -> None:
        if not self._retain_after_backward_done:
            self._retain_after_backward_done = True
            self.retain.hybrid.after_backward(model, self.retain.ctx)

    # -- weights on resume ----------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        weights = self.retain.pending_weights
        if weights is None or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from retain.train.checkpoint import load_weights

        load_weights(self.accelerator.unwrap_model(model if model is not None else self.model), weights)


def _retain_batch(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The three tensors retain's hooks read (and the per-row fields transforms add: replay's mark of its
    rows, flow's sample weights); padding-free batches (no attention_mask) are refused."""
    missing = [k for k in BATCH_KEYS if k not in inputs]
    if missing:
        raise ConfigError(
            f"retain's hooks need {', '.join(BATCH_KEYS)} in each batch; this one lacks {', '.join(missing)} "
            "(padding-free or packed-without-mask collators are not supported: set padding_free=False)"
        )
    return {k: inputs[k] for k in (*BATCH_KEYS, REPLAYED, SAMPLE_WEIGHT) if k in inputs}


class RetainCallback(TrainerCallback):
    """The Trainer's step events -> retain's hooks and step counters; checkpoints get retain's state."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    @property
    def session(self) -> Any:
        return self.trainer.retain

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.ctx.model = self.trainer.model_wrapped  # wrapped by now (DDP, ...); hooks may run forwards

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session, ctx = self.session, self.session.ctx
        ctx.step_in_task = state.global_step - session.task_start_step
        ctx.global_step = session.global_offset + ctx.step_in_task
        self.trainer._retain_after_backward_done = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._retain_after_backward(self.trainer.model_wrapped)  # when clipping is off

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session = self.session
        session.hybrid.after_step(self.trainer.model_wrapped, session.ctx)
        session.ctx.global_step += 1
        self.trainer._retain_steps += 1

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from pathlib import Path

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from retain.integrations.checkpoint import RetainState, save_state, state_weights

        if not state.is_world_process_zero:
            return
        session, ctx = self.session, self.session.ctx
        unwrapped = ctx.unwrapped_model
        checkpoint = Path(self.trainer._get_output_dir(None)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save_state(checkpoint, RetainState(
            task_index=ctx.task.index,
            task_name=ctx.task.name,
            task_start_step=session.task_start_step,
            global_offset=session.global_offset,
            strategies=session.hybrid.state_dict(),
            weights=state_weights(unwrapped, adapters=is_peft_model(unwrapped), full=session.hybrid.modifies_frozen_weights),
        ))


def retain_trainer(trainer_class: type) -> type:
    """``trainer_class`` with retain's hooks: ``retain_trainer(SFTTrainer)(..., retain=session)``."""
    if issubclass(trainer_class, RetainTrainerMixin):
        return trainer_class
    return type(f"Retain{trainer_class.__name__}", (RetainTrainerMixin, trainer_class), {})
