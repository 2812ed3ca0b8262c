"""retain inside other people's training loops: ``transformers.Trainer`` and TRL's ``SFTTrainer``.

    from retain.integrations import RetainSession, retain_trainer

    session = RetainSession.create(strategies="lora+lwf", task=("contracts", "contracts.jsonl"),
                                   general_data="general.jsonl", suite="suite.yaml", output_dir="runs/x")
    model = session.setup(model, tokenizer)          # scores the base model, wraps it (LoRA, prompts)
    trainer = retain_trainer(SFTTrainer)(model=model, args=args, train_dataset=ds, retain=session)
    session.train(trainer)                           # before_task, trainer.train(), after_task, scores
    session.finish()                                 # final/, results.json, report.html

Install TRL with ``pip install retain[trl]``; a plain ``transformers.Trainer`` needs nothing more and can
train on ``session.train_dataset()`` with ``session.data_collator`` (retain's own tokenization).
"""

from retain.integrations.session import ExampleCollator, ExampleDataset, RetainSession
from retain.integrations.trainer import RetainCallback, RetainTrainerMixin, retain_trainer, scaled_loss

__all__ = [
    "ExampleCollator",
    "ExampleDataset",
    "RetainCallback",
    "RetainSession",
    "RetainTrainerMixin",
    "retain_trainer",
    "scaled_loss",
]
