"""Synthetic rehearsal data: the model writes its own replay examples (Self-Synthesized Rehearsal,
Huang et al., ACL 2024), so no real training example has to be kept.

The pipeline, each step a small function usable on its own:

1. **Generate** candidates by sampling (top-p, temperature, repetition penalty; SSR: 0.6 / 0.9 / 1.2):
   - from a task description plus a few demonstrations (in-context learning): the prompt is
     ``description SEP demo_1 SEP demo_2 SEP`` and the continuation up to the next ``SEP`` is a new
     example. Prompt/completion demonstrations take two passes, as in SSR: first a new prompt is sampled
     from the demonstrations' prompts, then its completion is generated greedily with the full
     demonstrations in context;
   - or from general prompts ("Once upon a time"): the example is the prompt plus its continuation.
2. **Remove near-duplicates**: character n-gram (shingle) Jaccard similarity above a threshold.
3. **Select a representative subset** (optional), as SSR's ``kmeans_self.py`` does: the mean
   last-layer hidden state of each candidate (SSR: a sentence encoder's pooled output), L2-normalized,
   clustered by k-means into 20 clusters; each cluster gets a share of the kept set proportional to
   its size, filled by its members nearest the centroid (SSR keeps 200 per task). Outliers form
   small clusters whose share rounds to nothing, so they are not kept.
4. **Relabel** (optional, prompt/completion only): the latest model completes each synthetic prompt
   greedily, so rehearsal teaches what the model answered when it knew the task.
5. **Save** the set as JSONL, one record per line (``text`` or ``prompt`` + ``completion``), to inspect
   or reuse.

Sampling runs under a forked, seeded RNG, so generation is reproducible and does not move the
training run's random streams.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from retain.data import IGNORE_INDEX, Example
from retain.io import atomic_write_text
from retain.models.runtime import eval_mode, model_device

Record = dict[str, str]
Demonstration = str | Mapping[str, str]


@dataclass(frozen=True)
class SamplingSettings:
    """How candidates are sampled; defaults are SSR's (top-p 0.6, temperature 0.9, penalty 1.2)."""

    max_new_tokens: int = 64
    completion_max_new_tokens: int = 32
    temperature: float = 0.9
    top_p: float = 0.6
    repetition_penalty: float = 1.2
    separator: str = "\n\n"
    batch_size: int = 16


# --------------------------------------------------------------------------------------------
# Generation


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global torch RNG seeded to ``seed``, restoring the outer state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield




def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {text[:40]!r} tokenizes to nothing; give a non-empty prompt")
    return ids


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def cut_at(text: str, stop: str | None) -> str:
    """``text`` up to the first ``stop`` (all of it when ``stop`` is empty or absent)."""
    return text.split(stop, 1)[0] if stop else text


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: SamplingSettings,
    *,
    sample: bool = True,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> list[str]:
    """One continuation per prompt (new tokens only, special tokens dropped, cut at the separator;
    leading whitespace kept, since a completion's first space can matter).

    ``sample=False`` decodes greedily (the repetition penalty still applies).
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "top_p": settings.top_p, "temperature": settings.temperature} if sample else {"do_sample": False}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens or settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    device = model_device(model)
    encoded = [_encode(tokenizer, p) for p in prompts]
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int):
        room = context - config.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens {config.max_new_tokens} leaves no room in the model's {context}-token context")
        encoded = [ids[-room:] for ids in encoded]  # keep the end of long prompts: it holds the latest demonstration
    outputs: list[str] = []
    with eval_mode(model), seeded_rng(seed, device):
        for start in range(0, len(encoded), settings.batch_size):
            ids, mask = _left_pad(encoded[start : start + settings.batch_size], pad_id, device)
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in generated[:, ids.shape[1] :]:
                text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
                outputs.append(cut_at(text, settings.separator))
    return outputs


def icl_prompt(description: str, demonstrations: Sequence[str], separator: str) -> str:
    """``description SEP demo_1 SEP ... demo_n SEP``: the model's next block is a new example."""
    parts = ([description.strip()] if description.strip() else []) + [d.strip() for d in demonstrations]
    if not parts:
        raise ValueError("an in-context prompt needs a description or at least one demonstration")
    return separator.join(parts) + separator


def _is_pair(demo: Demonstration) -> bool:
    return isinstance(demo, Mapping)


def generate_candidates(
    model: nn.Module,
    tokenizer: Any,
    n: int,
    settings: SamplingSettings,
    *,
    description: str = "",
    demonstrations: Sequence[Demonstration] = (),
    prompts: Sequence[str] = (),
    seed: int = 0,
) -> list[Record]:
    """``n`` candidate records (empty generations dropped): from a description and/or demonstrations
    (in context), else from general prompts."""
    if demonstrations or description.strip():
        pairs = [_is_pair(d) for d in demonstrations]
        if any(pairs) and not all(pairs):
            raise ValueError("demonstrations must be all texts or all {prompt, completion} pairs, not a mix")
        if pairs and all(pairs):
            return _pair_candidates(model, tokenizer, n, settings, description, demonstrations, seed)
        context = icl_prompt(description, [str(d) for d in demonstrations], settings.separator)
        texts = [t.strip() for t in generate(model, tokenizer, [context] * n, settings, seed=seed)]
        return [{"text": t} for t in texts if t]
    if not prompts:
        raise ValueError("generate_candidates needs a description, demonstrations or general prompts")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    continuations = generate(model, tokenizer, chosen, settings, seed=seed)
    return [{"text": p + c.rstrip()} for p, c in zip(chosen, continuations) if c.strip()]


def _pair_candidates(
    model: nn.Module,
    tokenizer: Any,
    n: int,
    settings: SamplingSettings,
    description: str,
    demonstrations: Sequence[Mapping[str, str]],
    seed: int,
) -> list[Record]:
    """SSR's two passes: sample new inputs from the demonstrations' inputs, then answer each in context."""
    sep = settings.separator
    context = icl_prompt(description, [d["prompt"] for d in demonstrations], sep)
    new_prompts = [p.strip() for p in generate(model, tokenizer, [context] * n, settings, seed=seed)]
    new_prompts = [p for p in new_prompts if p]
    solved = icl_prompt(description, [d["prompt"] + d["completion"] for d in demonstrations], sep)
    completions = generate(
        model,
        tokenizer,
        [solved + p for p in new_prompts],
        settings,
        sample=False,
        max_new_tokens=settings.completion_max_new_tokens,
    )
    return [{"prompt": p, "completion": c.rstrip()} for p, c in zip(new_prompts, completions) if c.strip()]


def relabel(model: nn.Module, tokenizer: Any, records: Sequence[Record], settings: SamplingSettings) -> list[Record]:
    """Prompt/completion records with completions regenerated greedily by ``model``; text records unchanged."""
    pairs = [i for i, r in enumerate(records) if "prompt" in r]
    out = [dict(r) for r in records]
    if not pairs:
        return out
    completions = generate(
        model,
        tokenizer,
        [records[i]["prompt"] for i in pairs],
        settings,
        sample=False,
        max_new_tokens=settings.completion_max_new_tokens,
    )
    for i, completion in zip(pairs, completions):
        out[i]["completion"] = completion.rstrip()
    return [r for r in out if "completion" not in r or r["completion"].strip()]


def record_text(record: Record) -> str:
    return record["text"] if "text" in record else record["prompt"] + record["completion"]


# --------------------------------------------------------------------------------------------
# Near-duplicates


def shingles(text: str, n: int = 5) -> set[str]:
    """Character n-grams of the whitespace-normalised, lower-cased text (the text itself if shorter)."""
    norm = " ".join(text.lower().split())
    if len(norm) <= n:
        return {norm}
    return {norm[i : i + n] for i in range(len(norm) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def drop_near_duplicates(texts: Sequence[str], threshold: float = 0.8, n: int = 5) -> list[int]:
    """Indices of the texts kept: each is dropped if its shingle Jaccard with an earlier kept one is >= threshold."""
    kept: list[int] = []
    kept_sets: list[set[str]] = []
    for i, text in enumerate(texts):
        s = shingles(text, n)
        if any(jaccard(s, other) >= threshold for other in kept_sets):
            continue
        kept.append(i)
        kept_sets.append(s)
    return kept


# --------------------------------------------------------------------------------------------
# Diverse subset


def mean_hidden_states(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """[N, hidden] mean of the last layer's hidden states over each text's tokens (float32, on CPU)."""
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [_encode(tokenizer, t) for t in texts]
    out = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            hidden = hidden[:, -width:].float()  # a prompt-learning wrapper prepends virtual tokens
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], assignment [N]) by k-means++ seeding and Lloyd iterations; empty clusters are
    re-seeded at the point farthest from its centroid, so every cluster ends with at least one member."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k={k}")
    generator = torch.Generator().manual_seed(seed)
    x = x.float()
    centroids = [x[int(torch.randint(n, (1,), generator=generator))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centroids)).pow(2).min(dim=1).values
        if float(d2.sum()) <= 0:
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(d2 / d2.sum(), 1, generator=generator))
        centroids.append(x[pick])
    c = torch.stack(centroids)
    assign = torch.cdist(x, c).argmin(dim=1)
    for _ in range(iterations):
        for j in range(k):
            members = assign == j
            if members.any():
                c[j] = x[members].mean(0)
            else:
                far = torch.cdist(x, c).gather(1, assign[:, None]).squeeze(1).argmax()
                c[j] = x[far]
                assign[far] = j
        new_assign = torch.cdist(x, c).argmin(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return c, assign


def l2_normalized(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (zero rows left at zero)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def proportional_quotas(sizes: Sequence[int], total: int) -> list[int]:
    """How many points each cluster gives: ``round(total * n_c / N)`` (SSR, half rounded up), capped by
    the cluster's size, then fixed up so the quotas sum to exactly ``min(total, N)``: while short, one
    more to the cluster with the most members per point it gives (``n_c / (q_c + 1)``, largest first);
    while over, one less from the one with the fewest (``n_c / q_c``); ties go to the lower index.
    Both favour large clusters, so a fix-up never hands a seat to an outlier's tiny cluster before a
    dense one."""
    n = sum(sizes)
    want = min(total, n)
    quotas = [min(size, int(math.floor(total * size / n + 0.5))) if n else 0 for size in sizes]
    while sum(quotas) < want:
        open_ = [c for c in range(len(sizes)) if quotas[c] < sizes[c]]
        best = max(open_, key=lambda c: (sizes[c] / (quotas[c] + 1), -c))
        quotas[best] += 1
    while sum(quotas) > want:
        given = [c for c in range(len(sizes)) if quotas[c] > 0]
        worst = min(given, key=lambda c: (sizes[c] / quotas[c], c))
        quotas[worst] -= 1
    return quotas


def diverse_subset(x: torch.Tensor, k: int, seed: int = 0, clusters: int = 20) -> list[int]:
    """Sorted indices of ``k`` representative points, SSR's selection: k-means (k-means++, seeded) with
    ``clusters`` clusters on the L2-normalized rows, then per cluster its ``proportional_quotas`` share,
    the members nearest its centroid (cosine geometry, as the rows are unit length)."""
    if k >= x.shape[0]:
        return list(range(x.shape[0]))
    unit = l2_normalized(x)
    centroids, assign = kmeans(unit, min(clusters, unit.shape[0]), seed)
    members = [(assign == j).nonzero().flatten() for j in range(centroids.shape[0])]
    quotas = proportional_quotas([len(m) for m in members], k)
    chosen: list[int] = []
    for j, (group, quota) in enumerate(zip(members, quotas)):
        if quota == 0:
            continue
        distances = (unit[group] - centroids[j]).norm(dim=1)
        order = torch.sort(distances, stable=True).indices[:quota]
        chosen += [int(i) for i in group[order]]
    return sorted(chosen)


# --------------------------------------------------------------------------------------------
# The whole set


def synthesize(
    model: nn.Module,
    tokenizer: Any,
    keep: int,
    settings: SamplingSettings,
    *,
    candidates: int | None = None,
    description: str = "",
    demonstrations: Sequence[Demonstration] = (),
    prompts: Sequence[str] = (),
    dedup_threshold: float | None = 0.8,
    select: str = "kmeans",
    seed: int = 0,
    clusters: int = 20,
) -> list[Record]:
    """Generate ``candidates`` (default 2 x ``keep``), drop near-duplicates, keep ``keep`` of them
    (SSR's k-means selection with ``clusters`` clusters, or the first ones)."""
    records = generate_candidates(
        model,
        tokenizer,
        candidates or 2 * keep,
        settings,
        description=description,
        demonstrations=demonstrations,
        prompts=prompts,
        seed=seed,
    )
    if dedup_threshold is not None and dedup_threshold < 1.0:
        records = [records[i] for i in drop_near_duplicates([record_text(r) for r in records], dedup_threshold)]
    if len(records) <= keep:
        return records
    if select == "kmeans":
        features = mean_hidden_states(model, tokenizer, [record_text(r) for r in records], settings.batch_size)
        return [records[i] for i in diverse_subset(features, keep, seed, clusters)]
    return records[:keep]


def records_to_examples(records: Sequence[Record], tokenizer: Any, max_length: int) -> list[Example]:
    """Token ids + labels like task data: text fully labelled, prompt/completion with the prompt masked."""
    from retain.config import DataConfig
    from retain.data import tokenize_records

    examples: list[Example] = []
    for fmt, group in (("text", [r for r in records if "text" in r]), ("prompt_completion", [r for r in records if "prompt" in r])):
        if group:
            cfg = DataConfig(path="<synthetic>", format=fmt, max_length=max_length, pack=False)
            examples += tokenize_records(list(group), tokenizer, cfg, "synthetic replay set")[0]
    return examples


def example_as_demonstration(example: Example, tokenizer: Any) -> Demonstration:
    """A tokenized training example back as a demonstration: text, or {prompt, completion} when masked."""
    prompt_len = 0
    while prompt_len < len(example.labels) and example.labels[prompt_len] == IGNORE_INDEX:
        prompt_len += 1
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    if prompt_len == 0:
        return decode(example.input_ids)
    return {"prompt": decode(example.input_ids[:prompt_len]), "completion": decode(example.input_ids[prompt_len:])}


# --------------------------------------------------------------------------------------------
# JSONL


def save_jsonl(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per line, atomically (a temp file renamed into place)."""
    return atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records))


def load_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
