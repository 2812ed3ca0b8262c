"""Throughput of retain's evaluation against lm-eval's HFLM on the same model, data and batch size.

Two workloads, each timed in alternating rounds (retain, lm-eval, retain, lm-eval, ...) so that
machine noise hits both sides alike:

* loss: retain ``tasks.loss`` over TinyStories validation text vs lm-eval ``loglikelihood_rolling``
  on the same stories (max_length = the window length for both);
* multiple choice: retain ``tasks.multiple_choice`` on CUAD Yes/No clauses vs lm-eval
  ``loglikelihood`` requests for the same (prompt, " No"/" Yes") pairs.

Throughput is scored tokens per second; the ratio retain/lm-eval should be >= 1.0. The model is
stories260K imported to Hugging Face format when ``<data-dir>/stories260k`` exists, else a small
random Llama (printed). Run: ``python bench/eval_throughput.py [--help]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retain.eval import tasks as T  # noqa: E402

PROMPT = "Clause: {text}\nAnswer:"
CHOICES = ["No", "Yes"]
FALLBACK_TEXT = [
    "Once upon a time there was a little cat named Tom. Tom liked to play in the garden with his red ball.",
    "One day the sun was hot and Tom went to sleep under a tree. When he woke up, his friend the dog was there.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data", help="shared data root")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where stories260K is imported (default: retain cache)")
    parser.add_argument("--cuad-task", default="cuad_anti_assignment", help="legalbench-cuad task folder")
    parser.add_argument("--stories", type=int, default=200, help="TinyStories paragraphs for the loss workload")
    parser.add_argument("--mc-examples", type=int, default=150, help="CUAD clauses for the multiple-choice workload")
    parser.add_argument("--max-length", type=int, default=256, help="loss window / lm-eval max_length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (alternating)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps timings of this small model stable on a busy machine (0: torch default)")
    parser.add_argument("--skip-lm-eval", action="store_true", help="time retain only")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Model and data


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """stories260K in HF format if its source files exist, else a random small Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (args.data_dir / "stories260k").is_dir():
        try:
            from retain.eval.cache import default_cache_dir
            from retain.models.llama2c import ensure_stories260k

            model_dir = ensure_stories260k(args.data_dir, args.cache_dir or default_cache_dir())
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            return model, AutoTokenizer.from_pretrained(model_dir), f"stories260K ({model_dir})"
        except Exception as err:  # importer missing or broken: fall back, but say so
            print(f"NOTE: could not import stories260K ({type(err).__name__}: {err}); using a random Llama")
    else:
        print(f"NOTE: {args.data_dir / 'stories260k'} not found; using a random Llama (numbers are not stories260K's)")
    return (*_random_llama(), "random Llama (hidden 64, 4 layers)")


def _random_llama() -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(FALLBACK_TEXT, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=512)
    return LlamaForCausalLM(config).eval(), tok


def load_stories(args: argparse.Namespace) -> list[str]:
    path = args.data_dir / "tinystories-val" / "tinystories_val.txt"
    if not path.is_file():
        print(f"NOTE: {path} not found; using built-in sentences")
        return FALLBACK_TEXT * (args.stories // 2)
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paragraphs[: args.stories]


def load_clauses(args: argparse.Namespace) -> list[T.ChoiceExample]:
    path = args.data_dir / "legalbench-cuad" / args.cuad_task / "test.tsv"
    if not path.is_file():
        print(f"NOTE: {path} not found; using built-in clauses")
        rows = [{"text": s, "label": CHOICES[i % 2]} for i, s in enumerate(FALLBACK_TEXT * (args.mc_examples // 2))]
    else:
        csv.field_size_limit(2**31 - 1)
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))[: args.mc_examples]
    return [T.ChoiceExample(PROMPT.format(text=r["text"]), CHOICES, T.resolve_label(r["label"], CHOICES)) for r in rows]


# --------------------------------------------------------------------------------------------
# The two sides


def retain_loss(model, tok, stories, args) -> tuple[int, float]:
    nll, _ = T.loss(model, tok, stories, args.max_length, args.batch_size)
    return nll.n, nll.value


def lm_eval_loss(lm, stories) -> tuple[int, float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(stories)]
    total = sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
    n = sum(len(lm.tok_encode(s)) for s in stories)
    return n, -total / n


def retain_mc(model, tok, examples, args) -> tuple[int, float]:
    result = T.multiple_choice(model, tok, examples, batch_size=args.batch_size, max_length=args.context)
    return args.mc_tokens, result.value


def lm_eval_mc(lm, examples, args) -> tuple[int, float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, (ex.prompt, " " + c), i) for i, ex in enumerate(examples) for c in ex.choices]
    lls = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    correct = sum(int(max(range(2), key=lambda j: (lls[2 * k + j], -j)) == ex.label) for k, ex in enumerate(examples))
    return args.mc_tokens, correct / len(examples)


def mc_tokens(tok, examples: list[T.ChoiceExample], context: int) -> int:
    """Tokens in all (prompt, choice) pairs as the model sees them (after left-truncation)."""
    pairs = [T.encode_pair(tok, ex.prompt, " " + c) for ex in examples for c in ex.choices]
    return sum(min(len(a) + len(b), context + 1) - 1 for a, b in pairs)


# --------------------------------------------------------------------------------------------
# Timing


def timed(fn: Callable[[], tuple[int, float]]) -> tuple[float, int, float]:
    """Seconds, tokens and value of one run; stderr is swallowed (lm-eval's rolling path always
    draws progress bars)."""
    with contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        tokens, value = fn()
        seconds = time.perf_counter() - start
    return seconds, tokens, value


def compare(name: str, ours: Callable[[], tuple[int, float]], theirs: Callable[[], tuple[int, float]] | None, rounds: int) -> None:
    print(f"\n== {name}")
    rates: dict[str, list[float]] = {"retain": [], "lm-eval": []}
    for r in range(rounds):
        for side, fn in (("retain", ours), ("lm-eval", theirs)):
            if fn is None:
                continue
            seconds, tokens, value = timed(fn)
            rates[side].append(tokens / seconds)
            print(f"round {r + 1} {side:8s} {seconds:7.3f} s  {tokens:8d} tokens  {tokens / seconds:10.0f} tok/s  value={value:.6f}")
    for side, values in rates.items():
        if values:
            print(f"{side:8s} median {statistics.median(values):8.0f} tok/s   best {max(values):8.0f} tok/s")
    if rates["lm-eval"]:
        median = statistics.median(rates["retain"]) / statistics.median(rates["lm-eval"])
        best = max(rates["retain"]) / max(rates["lm-eval"])
        print(f"ratio retain/lm-eval: median {median:.2f}, best {best:.2f}  (target >= 1.0)")


def _quiet() -> None:
    """Keep the timing lines readable: no progress bars, no per-request truncation warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, label = load_model(args)
    stories, examples = load_stories(args), load_clauses(args)
    args.context = getattr(model.config, "max_position_embeddings", None) or 2048
    args.mc_tokens = mc_tokens(tok, examples, args.context)
    print(f"model: {label}; params={sum(p.numel() for p in model.parameters()):,}; torch threads={torch.get_num_threads()}")
    print(f"loss: {len(stories)} stories, window {args.max_length}; multiple choice: {len(examples)} clauses "
          f"({args.cuad_task}), {args.mc_tokens} tokens; batch size {args.batch_size}; {args.rounds} rounds")
    lm = None
    if not args.skip_lm_eval:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.max_length)
        lm_mc = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.context)
    T.loss(model, tok, stories[:8], args.max_length, args.batch_size)  # warm-up (allocator, kernels)
    compare("loss (retain tasks.loss vs lm-eval loglikelihood_rolling)",
            lambda: retain_loss(model, tok, stories, args), None if lm is None else (lambda: lm_eval_loss(lm, stories)), args.rounds)
    compare("multiple choice (retain tasks.multiple_choice vs lm-eval loglikelihood)",
            lambda: retain_mc(model, tok, examples, args), None if lm is None else (lambda: lm_eval_mc(lm_mc, examples, args)), args.rounds)
    print("\n(loss values differ by design: retain packs all text into full windows; lm-eval rolls each story "
          "separately with a prefix token. Multiple-choice accuracies must be equal.)")


if __name__ == "__main__":
    main()
