"""Tests for importing llama2.c's stories260K into a Hugging Face model directory.

They read the shared data folder (``../shared/data`` beside the repo, or ``$RETAIN_DATA_DIR``)
and skip when it is absent; nothing is copied into the repo.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from retain.errors import OutputError
from retain.models.llama2c import (
    Llama2cHeader,
    build_llama2c_tokenizer,
    ensure_stories260k,
    import_llama2c,
    llama2c_config,
    llama2c_to_hf_state_dict,
    read_llama2c_checkpoint,
    read_llama2c_vocab,
)

# Greedy (temperature 0) sample published in llama2.c's doc/stories260K.md, quoted in SOURCE.md.
PUBLISHED_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)
HEADER_BYTES = 28
DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ_LEN = 64, 172, 5, 8, 4, 512, 512


def _data_dir() -> Path:
    env = os.environ.get("RETAIN_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


DATA_DIR = _data_dir()
STORIES = DATA_DIR / "stories260k"
CHECKPOINT = STORIES / "stories260K.bin"
TOKENIZER = STORIES / "tok512.bin"

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT.is_file() and TOKENIZER.is_file()),
    reason=f"stories260K data not found under {DATA_DIR} (set RETAIN_DATA_DIR to the shared data folder)",
)


# ------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_stories260k(DATA_DIR, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def _raw_floats(offset_floats: int, count: int) -> np.ndarray:
    """Floats straight from the checkpoint file, independent of the reader under test."""
    return np.fromfile(CHECKPOINT, dtype="<f4", offset=HEADER_BYTES + 4 * offset_floats, count=count)


# ------------------------------------------------------------------------------------------
# text samples


def _tinystories_lines(n: int) -> list[str]:
    path = DATA_DIR / "tinystories-val" / "tinystories_val.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:n]


def _shakespeare_lines(n: int) -> list[str]:
    path = DATA_DIR / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:: max(1, len(lines) // n)][:n]


def _cuad_clauses(n: int) -> list[str]:
    files = sorted((DATA_DIR / "legalbench-cuad").glob("*/test.tsv"))
    if not files:
        pytest.skip(f"no legalbench-cuad test.tsv under {DATA_DIR}")
    per_file = max(1, n // len(files))
    texts: list[str] = []
    for path in files:
        with path.open(newline="", encoding="utf-8") as f:
            texts.extend(row["text"] for _, row in zip(range(per_file), csv.DictReader(f, delimiter="\t")))
    return texts[:n]


EDGE_CASES = [
    "",
    " ",
    "café – naïve ✓ 日本",
    "emoji 🙂 and\ttab",
    "  leading spaces",
    "trailing spaces  ",
    "line one\nline two\n\n",
    'literal <s> and </s> and <unk> and <0x41> are just text',
    "non-breaking\u00a0space and hair\u200aspace",
]


def _sample_lines(n_each: int) -> Iterator[str]:
    yield from _tinystories_lines(n_each)
    yield from _shakespeare_lines(n_each)
    yield from _cuad_clauses(n_each)
    yield from EDGE_CASES


# ------------------------------------------------------------------------------------------
# reference llama2.c encoder (run.c's encode(), without BOS/EOS)


class ReferenceEncoder:
    """Direct transcription of llama2.c's encode algorithm, for comparison only."""

    def __init__(self, tok_path: Path) -> None:
        vocab = read_llama2c_vocab(tok_path, VOCAB)
        self.pieces = vocab.pieces
        self.scores = vocab.scores
        self.ids = {piece: i for i, piece in enumerate(vocab.pieces)}

    def _initial_ids(self, text: str) -> list[int]:
        ids = [self.ids[b" "]]  # dummy prefix
        for char in text:
            encoded = char.encode("utf-8")
            if encoded in self.ids:
                ids.append(self.ids[encoded])
            else:
                ids.extend(byte + 3 for byte in encoded)  # byte fallback: <0x00> is id 3
        return ids

    def _best_pair(self, ids: list[int]) -> tuple[int, int] | None:
        best_score, best = -math.inf, None
        for i in range(len(ids) - 1):
            merged = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
            if merged is not None and self.scores[merged] > best_score:
                best_score, best = self.scores[merged], (i, merged)
        return best

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._initial_ids(text)
        while (best := self._best_pair(ids)) is not None:
            i, merged = best
            ids[i : i + 2] = [merged]
        return ids


# ------------------------------------------------------------------------------------------
# model


def test_greedy_generation_matches_published_sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    source_md = STORIES / "SOURCE.md"
    if source_md.is_file():
        assert PUBLISHED_GREEDY in source_md.read_text(encoding="utf-8")
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=64)
    text = tokenizer.decode(out[0], skip_special_tokens=True).strip()
    n = min(len(text), len(PUBLISHED_GREEDY))
    assert text[:n] == PUBLISHED_GREEDY[:n]
    assert n == len(PUBLISHED_GREEDY), f"generated only {text!r}"


def test_config_matches_header(model: PreTrainedModel) -> None:
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (DIM, HIDDEN, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (HEADS, KV_HEADS, VOCAB)
    assert cfg.max_position_embeddings == SEQ_LEN
    assert cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_loaded_weights_equal_file_floats(model: PreTrainedModel) -> None:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    emb = _raw_floats(0, VOCAB * DIM).reshape(VOCAB, DIM)
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"], emb)
    rms_att = _raw_floats(VOCAB * DIM, LAYERS * DIM).reshape(LAYERS, DIM)
    for i in range(LAYERS):
        np.testing.assert_array_equal(sd[f"model.layers.{i}.input_layernorm.weight"], rms_att[i])

    # wq follows rms_att; HF row j of head h is llama2.c row 2j (first half) or 2(j - hd/2) + 1.
    head_dim = DIM // HEADS
    wq = _raw_floats(VOCAB * DIM + LAYERS * DIM, LAYERS * DIM * DIM).reshape(LAYERS, DIM, DIM)
    for i in range(LAYERS):
        q_proj = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
        for h in range(HEADS):
            for j in range(head_dim):
                src = 2 * j if j < head_dim // 2 else 2 * (j - head_dim // 2) + 1
                np.testing.assert_array_equal(q_proj[h * head_dim + j], wq[i, h * head_dim + src])

    final_norm_offset = VOCAB * DIM + LAYERS * (2 * DIM + 2 * DIM * DIM + 2 * KV_HEADS * head_dim * DIM + 3 * DIM * HIDDEN)
    np.testing.assert_array_equal(sd["model.norm.weight"], _raw_floats(final_norm_offset, DIM))


def test_reader_layout_and_state_dict_mapping() -> None:
    header, weights = read_llama2c_checkpoint(CHECKPOINT)
    assert header == Llama2cHeader(DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ_LEN, shared_classifier=True)
    assert weights["wk"].shape == (LAYERS, KV_HEADS * DIM // HEADS, DIM)
    assert weights["freq_cis_real"].shape == (SEQ_LEN, DIM // HEADS // 2)
    sd = llama2c_to_hf_state_dict(header, weights)
    assert "lm_head.weight" not in sd
    torch.testing.assert_close(sd["model.layers.3.mlp.gate_proj.weight"], weights["w1"][3], rtol=0, atol=0)
    torch.testing.assert_close(sd["model.layers.3.mlp.up_proj.weight"], weights["w3"][3], rtol=0, atol=0)
    torch.testing.assert_close(sd["model.layers.3.mlp.down_proj.weight"], weights["w2"][3], rtol=0, atol=0)
    torch.testing.assert_close(sd["model.layers.2.self_attn.v_proj.weight"], weights["wv"][2], rtol=0, atol=0)
    # k_proj is a row permutation of wk within each KV head.
    k_rows = sorted(map(tuple, sd["model.layers.1.self_attn.k_proj.weight"].tolist()))
    assert k_rows == sorted(map(tuple, weights["wk"][1].tolist()))


# ------------------------------------------------------------------------------------------
# other checkpoint formats


def _legacy_untied_file(path: Path) -> torch.Tensor:
    """Rewrite stories260K as an untied legacy file (negative vocab size + trailing classifier)."""
    raw = CHECKPOINT.read_bytes()
    wcls = torch.arange(VOCAB * DIM, dtype=torch.float32).reshape(VOCAB, DIM) / 1000
    header = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, -VOCAB, SEQ_LEN)
    path.write_bytes(header + raw[HEADER_BYTES:] + wcls.numpy().astype("<f4").tobytes())
    return wcls


def test_untied_legacy_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "untied.bin"
    wcls = _legacy_untied_file(path)
    header, weights = read_llama2c_checkpoint(path)
    assert not header.shared_classifier and header.vocab_size == VOCAB
    assert not llama2c_config(header).tie_word_embeddings
    torch.testing.assert_close(llama2c_to_hf_state_dict(header, weights)["lm_head.weight"], wcls, rtol=0, atol=0)


def _version1_file(path: Path, header: Llama2cHeader, weights: dict[str, torch.Tensor]) -> None:
    """Write llama2.c's version-1 layout (ak42 header padded to 256 bytes, norms first)."""
    head = struct.pack("<Ii7iB", 0x616B3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ_LEN, 1)
    order = ["rms_att_weight", "rms_ffn_weight", "rms_final_weight", "token_embedding_table",
             "wq", "wk", "wv", "wo", "w1", "w2", "w3"]  # fmt: skip
    body = b"".join(weights[name].numpy().astype("<f4").tobytes() for name in order)
    path.write_bytes(head.ljust(256, b"\0") + body)


def test_version1_checkpoint_reads_like_legacy(tmp_path: Path) -> None:
    header, weights = read_llama2c_checkpoint(CHECKPOINT)
    path = tmp_path / "v1.bin"
    _version1_file(path, header, weights)
    header_v1, weights_v1 = read_llama2c_checkpoint(path)
    assert header_v1.version == 1
    assert llama2c_config(header_v1).to_dict() == llama2c_config(header).to_dict()
    for name, tensor in weights_v1.items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("keep_bytes", [10, HEADER_BYTES, 500_000, 1_056_539])
def test_truncated_checkpoint_names_file(tmp_path: Path, keep_bytes: int) -> None:
    path = tmp_path / "cut_short.bin"
    path.write_bytes(CHECKPOINT.read_bytes()[:keep_bytes])
    with pytest.raises(ValueError, match="cut_short.bin") as err:
        read_llama2c_checkpoint(path)
    if keep_bytes >= HEADER_BYTES:
        assert "truncated" in str(err.value) and "1056540" in str(err.value)


def test_oversized_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "too_long.bin"
    path.write_bytes(CHECKPOINT.read_bytes() + b"\0" * 8)
    with pytest.raises(ValueError, match=r"too_long\.bin.*8 unexpected trailing bytes"):
        read_llama2c_checkpoint(path)


def test_inconsistent_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad_heads.bin"
    path.write_bytes(struct.pack("<7i", DIM, HIDDEN, LAYERS, 7, KV_HEADS, VOCAB, SEQ_LEN) + b"\0" * 64)
    with pytest.raises(ValueError, match=r"bad_heads\.bin.*not divisible by n_heads=7"):
        read_llama2c_checkpoint(path)


def test_quantized_version2_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "q80.bin"
    head = struct.pack("<Ii7iB", 0x616B3432, 2, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ_LEN, 1)
    path.write_bytes(head.ljust(256, b"\0"))
    with pytest.raises(ValueError, match=r"q80\.bin.*version 2.*--version 1"):
        read_llama2c_checkpoint(path)


def test_truncated_tokenizer_names_file(tmp_path: Path) -> None:
    path = tmp_path / "tok_cut.bin"
    path.write_bytes(TOKENIZER.read_bytes()[:3000])
    with pytest.raises(ValueError, match="tok_cut.bin"):
        build_llama2c_tokenizer(path, VOCAB)


# ------------------------------------------------------------------------------------------
# tokenizer


def test_round_trip_is_exact(tokenizer: PreTrainedTokenizerBase) -> None:
    lines = list(_sample_lines(100))
    assert len(lines) >= 300
    encoded = tokenizer(lines, add_special_tokens=False).input_ids
    for line, ids in zip(lines, encoded, strict=True):
        assert tokenizer.decode(ids) == line
    with_bos = tokenizer(lines).input_ids
    for line, ids in zip(lines, with_bos, strict=True):
        assert ids[0] == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == line


def test_matches_llama2c_encode(tokenizer: PreTrainedTokenizerBase) -> None:
    reference = ReferenceEncoder(TOKENIZER)
    lines = [line[:400] for line in [*_tinystories_lines(35), *_shakespeare_lines(30), *_cuad_clauses(30)]]
    lines += EDGE_CASES
    for line in lines:
        assert tokenizer(line, add_special_tokens=False).input_ids == reference.encode(line), line


def test_special_tokens_and_padding(tokenizer: PreTrainedTokenizerBase) -> None:
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens([3, 258, 259]) == ["<0x00>", "<0xFF>", "\u2581t"]
    batch = tokenizer(["Once upon a time", "Hi"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()


def test_tokenizer_built_in_memory_matches_saved(tokenizer: PreTrainedTokenizerBase) -> None:
    fresh = build_llama2c_tokenizer(TOKENIZER, VOCAB)
    text = "Lily saw a big, red ball. Überraschung!"
    assert fresh(text).input_ids == tokenizer(text).input_ids


# ------------------------------------------------------------------------------------------
# import directory handling


def test_refuses_to_overwrite_without_flag(model_dir: Path) -> None:
    with pytest.raises(OutputError, match="--overwrite"):
        import_llama2c(CHECKPOINT, TOKENIZER, model_dir)


def test_ensure_reuses_then_reimports_on_change(model_dir: Path, tmp_path: Path) -> None:
    weights_file = model_dir / "model.safetensors"
    before = weights_file.stat().st_ino
    assert ensure_stories260k(DATA_DIR, model_dir.parent) == model_dir
    assert weights_file.stat().st_ino == before  # cached: not rewritten

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CHECKPOINT, data / CHECKPOINT.name)
    shutil.copy(TOKENIZER, data / TOKENIZER.name)
    cache = tmp_path / "cache"
    first = ensure_stories260k(data, cache)
    inode = (first / "model.safetensors").stat().st_ino
    raw = bytearray((data / CHECKPOINT.name).read_bytes())
    raw[-4:] = struct.pack("<f", 0.5)  # last freq_cis float: unused by HF, but the file changed
    (data / CHECKPOINT.name).write_bytes(bytes(raw))
    second = ensure_stories260k(data, cache)
    assert second == first
    assert (second / "model.safetensors").stat().st_ino != inode
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left behind
