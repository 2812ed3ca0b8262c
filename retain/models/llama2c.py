"""Import llama2.c checkpoints and tokenizers as standard Hugging Face model directories.

llama2.c (Karpathy) stores a Llama-architecture model as one flat float32 file and its
sentencepiece-derived BPE vocabulary as a small binary table.  Converting both into a
``LlamaForCausalLM`` + ``tokenizer.json`` directory lets the rest of ``retain`` treat a tiny
llama2.c model (e.g. stories260K) like any other Hugging Face causal LM.

Supported checkpoint formats:

* version 0 ("legacy"): 7 int32 header, then float32 arrays, RoPE tables, optional classifier;
* version 1: 256-byte header starting with the ``ak42`` magic, then float32 arrays.

Version 2 (Q8_0 int8) files are rejected with a clear error: re-export them with ``--version 1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from retain.errors import DataError, ModelError, OutputError
from retain.io import atomic_dir

__all__ = [
    "Llama2cHeader",
    "Llama2cVocab",
    "build_llama2c_tokenizer",
    "ensure_stories260k",
    "expected_checkpoint_bytes",
    "import_llama2c",
    "llama2c_config",
    "llama2c_to_hf_state_dict",
    "read_llama2c_checkpoint",
    "read_llama2c_vocab",
    "read_provenance",
]

# --------------------------------------------------------------------------------------------
# Constants

_LEGACY_HEADER = struct.Struct("<7i")
_VERSIONED_PREFIX = struct.Struct("<Ii7iB")  # magic, version, 7 params, shared-classifier flag
_VERSIONED_HEADER_BYTES = 256
_MAGIC = 0x616B3432  # "ak42" as written by llama2.c export.py
_FLOAT_BYTES = 4

#: Written next to the weights; records the sources' sha256 (used as the cache key).
PROVENANCE_FILE = "retain_import.json"
#: Bump when the conversion itself changes, so cached imports are rebuilt.
_IMPORT_FORMAT = 1

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
#: Padding uses ``<unk>``: byte fallback means ``<unk>`` never appears in encoded text, so masking
#: pad positions (e.g. ``labels[input_ids == pad_token_id] = -100``) can never hide a real token,
#: whereas padding with ``</s>`` or ``<s>`` would.
PAD_ID = UNK_ID

# --------------------------------------------------------------------------------------------
# Checkpoint reading

#: (name, shape) of each float32 array; names follow llama2.c's run.c ``TransformerWeights``.
TensorLayout = list[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Llama2cHeader:
    """Hyper-parameters from a llama2.c checkpoint header.

    ``vocab_size`` is always positive here; the legacy format's sign convention (negative means
    an untied classifier follows the other arrays) is decoded into ``shared_classifier``.
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    version: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def header_bytes(self) -> int:
        """Bytes before the first float array."""
        return _LEGACY_HEADER.size if self.version == 0 else _VERSIONED_HEADER_BYTES

    def problems(self) -> list[str]:
        """Reasons the numbers cannot describe a llama2.c model (empty when consistent)."""
        found = [
            f"{name}={value} must be positive"
            for name, value in (
                ("dim", self.dim),
                ("hidden_dim", self.hidden_dim),
                ("n_layers", self.n_layers),
                ("n_heads", self.n_heads),
                ("n_kv_heads", self.n_kv_heads),
                ("vocab_size", self.vocab_size),
                ("seq_len", self.seq_len),
            )
            if value <= 0
        ]
        if found:
            return found
        if self.dim % self.n_heads:
            found.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif self.head_dim % 2:
            found.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            found.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        return found


def _tensor_layout(header: Llama2cHeader) -> TensorLayout:
    """Names and shapes of the float32 arrays, in file order, for the header's format version."""
    h = header
    emb = ("token_embedding_table", (h.vocab_size, h.dim))
    rms_att = ("rms_att_weight", (h.n_layers, h.dim))
    rms_ffn = ("rms_ffn_weight", (h.n_layers, h.dim))
    rms_final = ("rms_final_weight", (h.dim,))
    attention = [
        ("wq", (h.n_layers, h.dim, h.dim)),
        ("wk", (h.n_layers, h.kv_dim, h.dim)),
        ("wv", (h.n_layers, h.kv_dim, h.dim)),
        ("wo", (h.n_layers, h.dim, h.dim)),
    ]
    ffn = [
        ("w1", (h.n_layers, h.hidden_dim, h.dim)),
        ("w2", (h.n_layers, h.dim, h.hidden_dim)),
        ("w3", (h.n_layers, h.hidden_dim, h.dim)),
    ]
    if h.version == 0:
        rope_tables = [
            ("freq_cis_real", (h.seq_len, h.head_dim // 2)),
            ("freq_cis_imag", (h.seq_len, h.head_dim // 2)),
        ]
        layout = [emb, rms_att, *attention, rms_ffn, *ffn, rms_final, *rope_tables]
    else:
        layout = [rms_att, rms_ffn, rms_final, emb, *attention, *ffn]
    if not h.shared_classifier:
        layout.append(("wcls", (h.vocab_size, h.dim)))
    return layout


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def expected_checkpoint_bytes(header: Llama2cHeader) -> int:
    """File size implied by the header: header bytes plus every float32 array."""
    floats = sum(_numel(shape) for _, shape in _tensor_layout(header))
    return header.header_bytes + _FLOAT_BYTES * floats


def _parse_header(path: Path, head: bytes) -> Llama2cHeader:
    """Decode either header flavour; raises ModelError naming ``path`` when it cannot."""
    if len(head) < _LEGACY_HEADER.size:
        raise ModelError(
            f"{path}: file is {len(head)} bytes, too small for a llama2.c header "
            f"({_LEGACY_HEADER.size} bytes)"
        )
    (first,) = struct.unpack_from("<I", head)
    if first != _MAGIC:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = _LEGACY_HEADER.unpack_from(head)
        return Llama2cHeader(
            dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0
        )
    if len(head) < _VERSIONED_HEADER_BYTES:
        raise ModelError(
            f"{path}: truncated header: llama2.c 'ak42' files need {_VERSIONED_HEADER_BYTES} "
            f"header bytes, file has {len(head)}"
        )
    _, version, *params, shared = _VERSIONED_PREFIX.unpack_from(head)
    if version != 1:
        hint = " (Q8_0 quantized); re-export it with llama2.c export.py --version 1" if version == 2 else ""
        raise ModelError(f"{path}: unsupported llama2.c checkpoint version {version}{hint}")
    return Llama2cHeader(*params, shared_classifier=bool(shared), version=1)


def _check_size(path: Path, header: Llama2cHeader, actual: int) -> None:
    expected = expected_checkpoint_bytes(header)
    if actual < expected:
        raise ModelError(
            f"{path}: truncated llama2.c checkpoint: header ({header}) implies {expected} bytes, "
            f"file has {actual} ({expected - actual} missing)"
        )
    if actual > expected:
        raise ModelError(
            f"{path}: wrong size for a llama2.c checkpoint: header ({header}) implies {expected} "
            f"bytes, file has {actual} ({actual - expected} unexpected trailing bytes)"
        )


def read_llama2c_checkpoint(path: str | os.PathLike[str]) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a llama2.c checkpoint (version 0 or 1) into named float32 tensors.

    Tensor names follow run.c (``token_embedding_table``, ``wq`` [n_layers, out, in], ...); weights
    are still in llama2.c's layout (interleaved RoPE pairs).  The file size is checked against the
    header first so a truncated or mismatched file fails loudly instead of loading garbage.
    """
    path = Path(path)
    actual = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_VERSIONED_HEADER_BYTES)
    header = _parse_header(path, head)
    if problems := header.problems():
        raise ModelError(f"{path}: invalid llama2.c header ({header}): {'; '.join(problems)}")
    _check_size(path, header, actual)

    layout = _tensor_layout(header)
    floats = np.fromfile(path, dtype="<f4", offset=header.header_bytes)
    flat = torch.from_numpy(floats.astype(np.float32, copy=False))
    chunks = flat.split([_numel(shape) for _, shape in layout])
    weights = {name: chunk.view(shape) for (name, shape), chunk in zip(layout, chunks, strict=True)}
    return header, weights


# --------------------------------------------------------------------------------------------
# Conversion to Hugging Face Llama


def _rope_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k output rows from llama2.c's interleaved RoPE pairs to HF's rotate-half halves.

    llama2.c rotates adjacent pairs (2i, 2i+1) within a head; HF's Llama rotates (i, i + d/2).
    Moving every head's even rows first and odd rows second makes both compute the same scores.
    """
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _layer_state_dict(header: Llama2cHeader, weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}"
    return {
        f"{prefix}.input_layernorm.weight": weights["rms_att_weight"][i],
        f"{prefix}.self_attn.q_proj.weight": _rope_to_rotate_half(weights["wq"][i], header.n_heads),
        f"{prefix}.self_attn.k_proj.weight": _rope_to_rotate_half(weights["wk"][i], header.n_kv_heads),
        f"{prefix}.self_attn.v_proj.weight": weights["wv"][i],
        f"{prefix}.self_attn.o_proj.weight": weights["wo"][i],
        f"{prefix}.post_attention_layernorm.weight": weights["rms_ffn_weight"][i],
        f"{prefix}.mlp.gate_proj.weight": weights["w1"][i],
        f"{prefix}.mlp.up_proj.weight": weights["w3"][i],
        f"{prefix}.mlp.down_proj.weight": weights["w2"][i],
    }


def llama2c_to_hf_state_dict(header: Llama2cHeader, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map llama2.c tensors to ``LlamaForCausalLM`` state-dict keys.

    Every returned tensor is a contiguous copy (safe to save or modify).  ``lm_head.weight`` is
    present only for untied checkpoints; tied ones rely on ``tie_word_embeddings``.  The RoPE
    frequency tables are dropped: HF recomputes them from ``rope_theta``.
    """
    state = {"model.embed_tokens.weight": weights["token_embedding_table"]}
    for i in range(header.n_layers):
        state.update(_layer_state_dict(header, weights, i))
    state["model.norm.weight"] = weights["rms_final_weight"]
    if not header.shared_classifier:
        state["lm_head.weight"] = weights["wcls"]
    return {key: tensor.contiguous().clone() for key, tensor in state.items()}


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """``LlamaConfig`` matching llama2.c's architecture (run.c's fixed eps and RoPE base)."""
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        max_position_embeddings=header.seq_len,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=header.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


# --------------------------------------------------------------------------------------------
# Tokenizer

_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_FIRST_BYTE_ID = 3
_FIRST_PIECE_ID = _FIRST_BYTE_ID + 256
_SPACE = "\u2581"  # sentencepiece's visible space


@dataclass(frozen=True)
class Llama2cVocab:
    """Raw llama2.c tokenizer table: piece bytes and scores, indexed by token id."""

    pieces: list[bytes]
    scores: list[float]
    max_token_length: int


def read_llama2c_vocab(tok_path: str | os.PathLike[str], vocab_size: int | None = None) -> Llama2cVocab:
    """Parse ``tokenizer.bin``: int32 max_token_length, then (float32 score, int32 len, bytes) records.

    When ``vocab_size`` is given the file must hold exactly that many records (as run.c assumes);
    otherwise records are read to the end of the file.
    """
    path = Path(tok_path)
    data = path.read_bytes()
    if len(data) < 4:
        raise ModelError(f"{path}: {len(data)} bytes is too small for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data)
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if offset + 8 > len(data):
            raise ModelError(f"{path}: truncated record header for token {len(pieces)} at byte {offset}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):
            raise ModelError(
                f"{path}: token {len(pieces)} claims {length} bytes at byte {offset}, file has {len(data)}"
            )
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    if vocab_size is not None and len(pieces) < vocab_size:
        raise ModelError(f"{path}: truncated tokenizer: expected {vocab_size} tokens, found {len(pieces)}")
    if offset != len(data):
        raise ModelError(
            f"{path}: {len(data) - offset} unexpected trailing bytes after {len(pieces)} tokens "
            f"(wrong vocab_size={vocab_size}?)"
        )
    return Llama2cVocab(pieces, scores, max_len)


def _hf_vocab(path: Path, vocab: Llama2cVocab) -> dict[str, int]:
    """Token string -> id, with special/byte names and literal spaces shown as U+2581."""
    if len(vocab.pieces) <= _FIRST_PIECE_ID:
        raise ModelError(f"{path}: {len(vocab.pieces)} tokens; a llama2.c vocab needs more than {_FIRST_PIECE_ID}")
    for byte in range(256):
        expected = f"<0x{byte:02X}>".encode()
        if vocab.pieces[_FIRST_BYTE_ID + byte] != expected:
            raise ModelError(
                f"{path}: token {_FIRST_BYTE_ID + byte} is {vocab.pieces[_FIRST_BYTE_ID + byte]!r}, "
                f"expected byte-fallback piece {expected!r}"
            )
    names = [*_SPECIAL_TOKENS, *(f"<0x{byte:02X}>" for byte in range(256))]
    for token_id, piece in enumerate(vocab.pieces[_FIRST_PIECE_ID:], start=_FIRST_PIECE_ID):
        try:
            names.append(piece.decode("utf-8").replace(" ", _SPACE))
        except UnicodeDecodeError as err:
            raise ModelError(f"{path}: token {token_id} is not valid UTF-8: {piece!r}") from err
    ids = {name: token_id for token_id, name in enumerate(names)}
    if len(ids) != len(names):
        raise ModelError(f"{path}: duplicate pieces in the tokenizer vocabulary")
    return ids


def _bpe_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges equivalent to llama2.c's "merge the adjacent pair with the best-scoring result".

    Every split of a merged piece into two vocabulary pieces is a merge whose priority is the
    merged piece's score (higher first).  Only regular pieces take part: llama2.c never forms
    special or byte-fallback tokens by merging.
    """
    regular = {name: token_id for name, token_id in vocab.items() if token_id >= _FIRST_PIECE_ID}
    ranked = sorted(regular.items(), key=lambda item: (-scores[item[1]], item[1]))
    merges = []
    for piece, _ in ranked:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in regular and right in regular:
                merges.append((left, right))
    return merges


def _backend_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """``tokenizers`` pipeline reproducing llama2.c encode/decode, including the dummy prefix."""
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in _SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    return tokenizer


def build_llama2c_tokenizer(
    tok_path: str | os.PathLike[str], vocab_size: int | None = None, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer that gives the same ids as llama2.c's ``encode``.

    ``tokenizer(text)`` prepends BOS (id 1), as llama2.c does when prompting; this comes from the
    ``tokenizer.json`` post-processor (transformers 5 does not persist ``add_bos_token``, so that
    attribute reads False even though BOS is added).  ``add_special_tokens=False`` gives the raw
    piece ids.  Like llama2.c, text such as ``"<s>"`` is encoded as ordinary characters, never as
    a control token (``split_special_tokens=True``).  ``decode`` inverts ``encode`` exactly (the
    dummy-prefix space is stripped), except that a literal U+2581 in the input decodes to a
    space, as with any sentencepiece-style tokenizer.  Padding uses ``<unk>`` (see ``PAD_ID``).
    """
    path = Path(tok_path)
    raw = read_llama2c_vocab(path, vocab_size)
    vocab = _hf_vocab(path, raw)
    backend = _backend_tokenizer(vocab, _bpe_merges(vocab, raw.scores))
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **extra,
    )


# --------------------------------------------------------------------------------------------
# Writing a Hugging Face directory


def _build_model(header: Llama2cHeader, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> LlamaForCausalLM:
    """Instantiate ``LlamaForCausalLM`` and load the converted weights, checking every key."""
    model = LlamaForCausalLM(llama2c_config(header))
    missing, unexpected = model.load_state_dict(llama2c_to_hf_state_dict(header, weights), strict=False)
    allowed_missing = {"lm_head.weight"} if header.shared_classifier else set()
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(f"llama2.c conversion mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    return model.to(dtype).eval()


def _generation_config() -> GenerationConfig:
    """Stop on EOS and also on BOS: llama2.c data separates stories with BOS, and run.c stops there."""
    return GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, BOS_ID], pad_token_id=PAD_ID)


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save, naming the public ``PreTrainedTokenizerFast`` class so transformers 4.x loads it too."""
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes "TokenizersBackend"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a file, or a non-empty folder unless asked: an import must not eat a model."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a directory", hint="choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(
            f"{out_dir} already exists and is not empty; pass --overwrite (overwrite=True) to replace it"
        )


def _require_source(path: Path, what: str) -> None:
    """A missing or unreadable source names the file, before anything is converted."""
    if not path.is_file():
        raise ModelError(f"llama2.c {what} not found: {path}", hint=f"pass the path of the llama2.c {what} (.bin)")


def _provenance(checkpoint: Path, tokenizer: Path, dtype: torch.dtype) -> dict[str, object]:
    """What an import was made from; ``ensure_stories260k`` compares it to decide on re-import."""
    return {
        "format": _IMPORT_FORMAT,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": _sha256(checkpoint),
        "tokenizer": tokenizer.name,
        "tokenizer_sha256": _sha256(tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
    }


def import_llama2c(
    checkpoint: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint + tokenizer into a Hugging Face model directory.

    The result loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` (safetensors weights, ``tokenizer.json``,
    ``generation_config.json``, plus ``retain_import.json`` recording the sources' sha256).
    Everything is written into a temporary directory beside ``out_dir`` and renamed into place,
    so an interrupted import never leaves a partial model.
    """
    checkpoint, tokenizer, out_dir = Path(checkpoint), Path(tokenizer), Path(out_dir)
    _require_source(checkpoint, "checkpoint")
    _require_source(tokenizer, "tokenizer")
    _prepare_out_dir(out_dir, overwrite)
    header, weights = read_llama2c_checkpoint(checkpoint)
    hf_tokenizer = build_llama2c_tokenizer(tokenizer, header.vocab_size, model_max_length=header.seq_len)
    model = _build_model(header, weights, dtype)
    model.generation_config = _generation_config()
    provenance = _provenance(checkpoint, tokenizer, dtype)

    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        _save_tokenizer(hf_tokenizer, staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# Cached stories260K import

STORIES260K_DIRNAME = "stories260k-hf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stories260k_sources(data_dir: Path) -> tuple[Path, Path]:
    """Locate stories260K.bin/tok512.bin in ``data_dir`` or its ``stories260k`` subfolder."""
    for folder in (data_dir / "stories260k", data_dir):
        checkpoint, tokenizer = folder / "stories260K.bin", folder / "tok512.bin"
        if checkpoint.is_file() and tokenizer.is_file():
            return checkpoint, tokenizer
    raise DataError(
        f"stories260K.bin and tok512.bin not found in {data_dir} or {data_dir / 'stories260k'}",
        hint="pass --data-dir pointing at the folder that holds stories260k/",
    )


def read_provenance(model_dir: str | os.PathLike[str]) -> dict[str, object] | None:
    """The ``retain_import.json`` written by ``import_llama2c``, or None if absent/unreadable."""
    try:
        return json.loads((Path(model_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_stories260k(data_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """Import stories260K into ``cache_dir/stories260k-hf`` unless an up-to-date import exists.

    ``data_dir`` is the shared data root (holding ``stories260k/``) or that folder itself.  The
    import is keyed by the sha256 of both source files (recorded in ``retain_import.json``), so a
    changed checkpoint or tokenizer triggers a fresh import.
    """
    checkpoint, tokenizer = _stories260k_sources(Path(data_dir))
    out_dir = Path(cache_dir) / STORIES260K_DIRNAME
    if read_provenance(out_dir) == _provenance(checkpoint, tokenizer, torch.float32):
        return out_dir
    return import_llama2c(checkpoint, tokenizer, out_dir, overwrite=True)
