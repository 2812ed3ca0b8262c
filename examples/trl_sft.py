"""Fine-tune with TRL's SFTTrainer (or transformers' Trainer) and retain's forgetting mitigations.

    python examples/trl_sft.py --model DIR --data contracts.jsonl --general general.jsonl \
        --strategies lora,lwf --steps 20 --out OUT

writes OUT/results.json (base vs. after scores, forgetting, drift) and OUT/report.html, OUT/final/ (the
adapter or model) and the Trainer's checkpoints under OUT/trainer/ (``--resume`` continues from the
newest). Works offline on a local model directory. Without ``--suite``, about a tenth of each file is held
out by content hash and scored (general loss and next-token accuracy, task loss and accuracy); only the
rest is trained on or used as distillation/replay anchors. Needs ``pip install retain[trl]`` unless
``--trainer hf``.

What is specific to retain is marked ``# retain:``; the rest is an ordinary TRL script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local model directory (or hub id when online)")
    parser.add_argument("--data", required=True, help="task data: jsonl with text, or prompt+completion, records")
    parser.add_argument("--general", default=None, help="general text the model must keep (anchors, replay, scoring)")
    parser.add_argument("--strategies", default="lora,lwf", help="retain strategies, e.g. lora,lwf or full,ewc")
    parser.add_argument("--task-name", default=None, help="task name in results (default: the data file's stem)")
    parser.add_argument("--suite", default=None, help="eval suite YAML; default: held-out parts of --data/--general")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/trainer")
    parser.add_argument("--trainer", choices=["sft", "hf"], default="sft", help="TRL SFTTrainer or transformers Trainer")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retain.integrations import RetainSession, retain_trainer  # retain:
    from retain.integrations.heldout import default_suite, split_file  # retain:

    args = parse_args(argv)
    out = Path(args.out)
    task_name = args.task_name or Path(args.data).stem
    use_cpu = not torch.cuda.is_available()

    # retain: score held-out text that training, replay and anchors never see
    suite, train_file, general_file = args.suite, Path(args.data), args.general
    if suite is None:
        from retain.eval.suite import load_suite_dict

        task_split = split_file(args.data, out / "data", task_name)
        general_split = split_file(args.general, out / "data", "general") if args.general else None
        train_file = task_split.train
        general_file = general_split.train if general_split else None
        first = Path(task_split.held_out).read_text().splitlines()[:1]
        prompts = [json.loads(line)["text"][:40] for line in first]  # the start of one held-out text
        suite = load_suite_dict(default_suite(
            task_name, task_split.held_out, general_split.held_out if general_split else None, args.max_length,
            prompts=prompts or None,
        ))

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)

    # retain: strategies, the task's data as retain tokenizes it, evaluation, outputs
    session = RetainSession.create(
        strategies=args.strategies,
        task=(task_name, {"path": str(train_file), "max_length": args.max_length}),
        general_data={"path": str(general_file), "max_length": args.max_length} if general_file else None,
        suite=suite, output_dir=out, model_name=args.model, seed=args.seed,
    )
    model = session.setup(model, tokenizer)  # retain: scores the base model, then wraps it (LoRA, ...)

    common = dict(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, logging_steps=max(1, args.steps // 10),
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, report_to=[],
        use_cpu=use_cpu, bf16=args.bf16, seed=args.seed, disable_tqdm=True,
    )
    if args.trainer == "sft":
        from datasets import load_dataset
        from trl import SFTConfig, SFTTrainer

        dataset = load_dataset("json", data_files=str(train_file), split="train")
        trainer = retain_trainer(SFTTrainer)(  # retain: the SFTTrainer with retain's hooks
            model=model, args=SFTConfig(max_length=args.max_length, packing=False, **common),
            train_dataset=dataset, processing_class=tokenizer, retain=session,
        )
    else:
        from transformers import Trainer, TrainingArguments

        trainer = retain_trainer(Trainer)(  # retain: the Trainer with retain's hooks, on retain's tokenization
            model=model, args=TrainingArguments(**common), train_dataset=session.train_dataset(),
            data_collator=session.data_collator, retain=session,
        )

    session.train(trainer, resume_from_checkpoint=True if args.resume else None)  # retain: task start/end around train()
    written = session.finish()  # retain: final/, results.json, report.html
    for what, path in written.items():
        print(f"{what}: {path}")
    return written


if __name__ == "__main__":
    main()
