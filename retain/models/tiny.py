"""Tiny models and a character tokenizer built from configs: offline tests, the demo, benchmarks.

The loop must not assume Llama, so tiny GPT-2 and Qwen2 configs are here too.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from torch import nn

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET, *, chat_template: str | None = None) -> Any:
    """A character-level fast tokenizer (one id per character, BOS prepended), made without downloads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in dict.fromkeys(alphabet):
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, context: int = 256) -> Any:
    """A small config for ``llama``, ``gpt2`` or ``qwen2``; sizes chosen to train in seconds on a CPU."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=context,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=context,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    raise ValueError(f"unknown tiny architecture '{arch}'; choose llama, gpt2 or qwen2")


def tiny_model(arch: str = "llama", vocab_size: int = 128, seed: int = 0, **sizes: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **sizes))


def write_arithmetic_run(root: Any, *, hidden: int = 32, layers: int = 2) -> None:
    """A tiny Llama (``root/model``), two prompt/completion tasks of uneven completion lengths
    (``add.jsonl``, ``mul.jsonl``) and general text (``general.jsonl``): the shared inputs of the
    multi-process equivalence tests and ``bench/fsdp_equivalence.py``, so both check the same case."""
    import json
    from pathlib import Path

    root = Path(root)
    tokenizer = char_tokenizer()
    tiny_model("llama", len(tokenizer), seed=0, hidden=hidden, layers=layers, heads=4).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name, op in (("add", "+"), ("mul", "*")):
        rows = [{"prompt": f"{i} {op} {i % 7} =", "completion": " " + str(eval(f"{i} {op} {i % 7}")) + " ok" * (i % 4)}
                for i in range(24)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    general = [{"text": f"the {w} sat on the mat number {i}." + " and then" * (i % 3)} for i, w in
               enumerate(["cat", "dog", "bird", "fox", "owl", "cow", "pig", "hen"] * 2)]
    (root / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in general))
