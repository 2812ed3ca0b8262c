"""A tiny byte-level BPE tokenizer trained in memory, so data tests need no downloads."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? I am fine, thank you.",
    "user: assistant: system: question answer prompt completion",
    "What is two plus two? Four. The capital of France is Paris.",
]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _backend() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def make_tokenizer(chat_template: str | None = None, pad: bool = True) -> PreTrainedTokenizerFast:
    """BOS-adding tokenizer with eos ``</s>``; optionally a ChatML-like chat template and no pad token."""
    kwargs = {"pad_token": "<pad>"} if pad else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(), bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kwargs
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
