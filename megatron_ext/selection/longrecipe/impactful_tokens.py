"""Impactful-token analysis (LongRecipe §4.1): which tokens does context extension change most?

Both models read the same text. For every token x_t (t >= 1) the change is the difference of the
unnormalised LM-head logits of the actual next token (the paper's Eq. 3 summand):

    delta_t = S_extended(x_t | x_<t) - S_base(x_t | x_<t)

The paper keeps the top 20 % of tokens by delta *at each position index* across its samples and
counts their part-of-speech tags. Ranking per position matters: how much an extended RoPE base or an
extension run changes the logits depends strongly on the position itself (far positions change
more), so a global ranking would mostly select late positions and say little about token types.
Per index needs many documents, though: with K documents an index holds K tokens, and "top 20 %" of
2 tokens is 1 of 2. Positions are therefore grouped into buckets of consecutive indices holding
at least ``MIN_TOKENS_PER_BUCKET`` tokens (width ceil(50 / K)); with 50 or more documents a bucket
is one index, the paper's definition.

Per token class (``token_classes``) the report gives: the class's share of all tokens (base rate),
its share of the top tokens, their ratio (lift: > 1 means over-represented among the most changed
tokens, the table's ranking), and the mean delta. The paper's Fig. 4 reports the top share alone,
which also grows with how common a class is.

Models are Hugging Face folders run with transformers (fp32 by default). Memory: the logits of one
document, max_tokens x vocab floats, exist briefly per model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext import jsonl
from megatron_ext.selection.longrecipe import token_classes as tc
from megatron_ext.errors import UserError

MIN_TOKENS_PER_BUCKET = 50


class AnalysisError(UserError):
    """Bad input for the analysis; the message names the flag, file or row."""


@dataclasses.dataclass
class DocumentDeltas:
    doc_id: str
    positions: np.ndarray  # index t of each scored token in its document (t >= 1)
    token_ids: np.ndarray
    delta: np.ndarray      # S_extended - S_base of the actual token, float64
    classes: List[str]
    pos: Optional[List[str]] = None


# ------------------------------------------------------------------------------------------
# Reading documents
# ------------------------------------------------------------------------------------------

def read_documents(path: str, text_key: str = "text", id_key: str = "id",
                   limit: Optional[int] = None) -> Iterator[Tuple[int, str, str]]:
    """(line number, id, text) of each non-empty document; bad rows raise naming the line."""
    if not os.path.exists(path):
        raise AnalysisError(f"--input {path}: no such file")
    taken = 0
    for line_no, row in jsonl.read_rows(path, lambda message, kind: AnalysisError(message)):
        if limit is not None and taken >= limit:
            return
        if not isinstance(row.get(text_key), str):
            raise AnalysisError(f"{path}:{line_no}: no string field {text_key!r} "
                                "(choose the field with --text-key)")
        taken += 1
        yield line_no, str(row.get(id_key, f"line{line_no}")), row[text_key]


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------

def load_model(path: str, dtype: str = "fp32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    from megatron_ext.dtypes import torch_dtype

    if not os.path.exists(os.path.join(path, "config.json")):
        raise AnalysisError(f"{path}: not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    return model.to(device).eval()


def next_token_logits(model, input_ids) -> np.ndarray:
    """S(x_t | x_<t) for t = 1 .. n-1: the logit the model gives the token that follows."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids.unsqueeze(0).to(model.device)).logits[0]
        picked = logits[:-1].gather(1, input_ids[1:].to(logits.device).unsqueeze(1)).squeeze(1)
    return picked.double().cpu().numpy()


def load_tokenizer(base_model: str, extended_model: str):
    """The base model's fast tokenizer; the extended model must tokenize the same way."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if not tokenizer.is_fast:
        raise AnalysisError(f"{base_model}: the analysis needs a fast (tokenizer.json) tokenizer "
                            "for character offsets")
    has_own = any(n.startswith("tokenizer") for n in os.listdir(extended_model))
    if has_own and AutoTokenizer.from_pretrained(extended_model).get_vocab() != \
            tokenizer.get_vocab():
        raise AnalysisError(f"--extended-model {extended_model} has a different vocabulary from "
                            f"--base-model {base_model}: logits are not comparable")
    return tokenizer


def _encode_prefix(tokenizer, text: str, max_tokens: int):
    """The first ``max_tokens`` tokens and their offsets; long texts are tokenized in part."""
    chars = max_tokens * 16
    while True:
        part = text[:chars]
        enc = tokenizer(part, return_offsets_mapping=True)
        if len(enc["input_ids"]) > max_tokens or len(part) == len(text):
            ids = enc["input_ids"][:max_tokens]
            return ids, [tuple(o) for o in enc["offset_mapping"][:max_tokens]], part
        chars *= 4


def score_documents(base, extended, tokenizer, documents: Sequence[Tuple[str, str]],
                    max_tokens: int, tagger=None, progress: bool = True) -> List[DocumentDeltas]:
    import torch
    from tqdm import tqdm

    vocab = [base.config.vocab_size, extended.config.vocab_size]
    if vocab[0] != vocab[1]:
        raise AnalysisError(f"the models' vocabularies differ ({vocab[0]} vs {vocab[1]})")
    out = []
    for doc_id, text in tqdm(documents, desc="scoring", unit="doc", disable=not progress):
        ids, offsets, part = _encode_prefix(tokenizer, text, max_tokens)
        if len(ids) < 2:
            continue
        input_ids = torch.tensor(ids)
        delta = next_token_logits(extended, input_ids) - next_token_logits(base, input_ids)
        classes = tc.token_classes(part, offsets)[1:]
        pos = tagger(part, offsets)[1:] if tagger else None
        out.append(DocumentDeltas(doc_id, np.arange(1, len(ids)), np.array(ids[1:]), delta,
                                  classes, pos))
    return out


# ------------------------------------------------------------------------------------------
# Top tokens per position and aggregation
# ------------------------------------------------------------------------------------------

def bucket_width(num_docs: int) -> int:
    return max(1, math.ceil(MIN_TOKENS_PER_BUCKET / max(num_docs, 1)))


def top_by_position(positions: np.ndarray, delta: np.ndarray, fraction: float,
                    width: int) -> np.ndarray:
    """Mask of the top ``fraction`` of tokens by delta within each bucket of ``width`` positions
    (ties: the earlier token in input order)."""
    if not 0 < fraction <= 1:
        raise AnalysisError(f"--top-fraction must be in (0, 1], got {fraction}")
    mask = np.zeros(len(delta), dtype=bool)
    buckets = positions // width
    for b in np.unique(buckets):
        idx = np.flatnonzero(buckets == b)
        k = max(1, int(round(fraction * len(idx))))
        order = np.argsort(-delta[idx], kind="stable")
        mask[idx[order[:k]]] = True
    return mask


def class_table(labels: Sequence[str], delta: np.ndarray, top: np.ndarray) -> List[dict]:
    """Per label: counts, base rate, top share, lift and mean deltas; ranked by lift."""
    labels = np.asarray(labels)
    total, total_top = len(labels), int(top.sum())
    rows = []
    for label in sorted(set(labels.tolist())):
        is_label = labels == label
        n, n_top = int(is_label.sum()), int((is_label & top).sum())
        base_rate, top_share = n / total, n_top / max(total_top, 1)
        rows.append({
            "class": label, "tokens": n, "top_tokens": n_top,
            "base_rate": base_rate, "top_share": top_share, "lift": top_share / base_rate,
            "mean_delta": float(delta[is_label].mean()),
            "sum_delta": float(delta[is_label].sum()),
            "mean_delta_top": float(delta[is_label & top].mean()) if n_top else None,
        })
    rows.sort(key=lambda r: (-r["lift"], -r["top_share"], r["class"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _position_profile(positions: np.ndarray, delta: np.ndarray, ranges: int = 8) -> List[dict]:
    """Mean delta over equal position ranges: shows why ranking is done per position."""
    edges = np.linspace(positions.min(), positions.max() + 1, ranges + 1).astype(int)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (positions >= lo) & (positions < hi)
        if sel.any():
            out.append({"positions": [int(lo), int(hi) - 1], "tokens": int(sel.sum()),
                        "mean_delta": float(delta[sel].mean()),
                        "mean_abs_delta": float(np.abs(delta[sel]).mean())})
    return out


def _token_types(tokenizer, token_ids: np.ndarray, delta: np.ndarray, top: np.ndarray,
                 limit: int = 20) -> List[dict]:
    """Eq. 3 per token type: delta summed over its occurrences; the ``limit`` largest."""
    sums: Dict[int, float] = {}
    counts: Dict[int, int] = {}
    tops: Dict[int, int] = {}
    for tid, d, t in zip(token_ids.tolist(), delta.tolist(), top.tolist()):
        sums[tid] = sums.get(tid, 0.0) + d
        counts[tid] = counts.get(tid, 0) + 1
        tops[tid] = tops.get(tid, 0) + int(t)
    best = sorted(sums, key=lambda k: -sums[k])[:limit]
    return [{"token": tokenizer.decode([tid]), "id": tid, "sum_delta": sums[tid],
             "count": counts[tid], "top_count": tops[tid]} for tid in best]


def build_report(docs: List[DocumentDeltas], tokenizer, top_fraction: float,
                 width: Optional[int] = None) -> dict:
    if not docs:
        raise AnalysisError("no document had two or more tokens: nothing to analyse")
    positions = np.concatenate([d.positions for d in docs])
    delta = np.concatenate([d.delta for d in docs])
    token_ids = np.concatenate([d.token_ids for d in docs])
    classes = [c for d in docs for c in d.classes]
    width = width or bucket_width(len(docs))
    top = top_by_position(positions, delta, top_fraction, width)
    report = {
        "documents": [{"id": d.doc_id, "tokens": int(len(d.delta) + 1)} for d in docs],
        "scored_tokens": int(len(delta)),
        "top_fraction": top_fraction,
        "position_bucket_width": width,
        "ranking": "per position bucket: the top fraction of tokens by delta within each bucket "
                   "of position_bucket_width consecutive positions, across documents",
        "top_tokens": int(top.sum()),
        "delta": {"mean": float(delta.mean()), "std": float(delta.std()),
                  "min": float(delta.min()), "max": float(delta.max()),
                  "mean_abs": float(np.abs(delta).mean())},
        "classes": class_table(classes, delta, top),
        "delta_by_position": _position_profile(positions, delta),
        "token_types": _token_types(tokenizer, token_ids, delta, top),
    }
    if docs[0].pos is not None:
        report["pos"] = {"available": True,
                         "classes": class_table([p for d in docs for p in d.pos], delta, top)}
    return report


def analyze(base_model: str, extended_model: str, input_path: str, text_key: str = "text",
            max_tokens: int = 2048, num_docs: int = 16, top_fraction: float = 0.2,
            width: Optional[int] = None, dtype: str = "fp32", device: str = "cpu",
            spacy_model: str = "en_core_web_sm", progress: bool = True) -> dict:
    """Score ``num_docs`` documents with both models and build the report (see module doc)."""
    if max_tokens < 2:
        raise AnalysisError(f"--max-tokens must be >= 2, got {max_tokens}")
    if num_docs < 1:
        raise AnalysisError(f"--num-docs must be >= 1, got {num_docs}")
    if not 0 < top_fraction <= 1:
        raise AnalysisError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    for flag, path in (("--base-model", base_model), ("--extended-model", extended_model)):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise AnalysisError(f"{flag} {path}: not a Hugging Face model folder (no config.json)")
    documents, empty = [], 0
    for _, doc_id, text in read_documents(input_path, text_key):
        if not text.strip():
            empty += 1
            continue
        documents.append((doc_id, text))
        if len(documents) == num_docs:
            break
    if not documents:
        raise AnalysisError(f"--input {input_path}: no non-empty documents")
    tagger, pos_note = tc.pos_tagger(spacy_model)
    tokenizer = load_tokenizer(base_model, extended_model)
    base = load_model(base_model, dtype, device)
    extended = load_model(extended_model, dtype, device)
    scored = score_documents(base, extended, tokenizer, documents, max_tokens, tagger, progress)
    report = build_report(scored, tokenizer, top_fraction, width)
    report.update(base_model=os.path.abspath(base_model),
                  extended_model=os.path.abspath(extended_model),
                  input=os.path.abspath(input_path), max_tokens=max_tokens,
                  skipped_documents={"empty": empty,
                                     "under_two_tokens": len(documents) - len(scored)})
    if "pos" not in report:
        report["pos"] = {"available": False, "reason": pos_note}
    notes = []
    if report["delta"]["mean_abs"] == 0:
        notes.append("the two models give identical logits: is --extended-model a different "
                     "model from --base-model?")
    report["notes"] = notes
    return report


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------

def format_table(rows: List[dict]) -> str:
    header = (f"{'rank':>4}  {'class':<15} {'tokens':>7} {'base rate':>9} {'top':>6} "
              f"{'top share':>9} {'lift':>6} {'mean delta':>10} {'mean top':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        top_mean = f"{r['mean_delta_top']:9.3f}" if r["mean_delta_top"] is not None else \
            f"{'-':>9}"
        lines.append(f"{r['rank']:>4}  {r['class']:<15} {r['tokens']:>7} {r['base_rate']:>9.3f} "
                     f"{r['top_tokens']:>6} {r['top_share']:>9.3f} {r['lift']:>6.2f} "
                     f"{r['mean_delta']:>10.3f} {top_mean}")
    return "\n".join(lines)


def draw_chart(rows: List[dict], path: str, title: str) -> Optional[str]:
    """Grouped bars (base rate vs share of top tokens) per class as a PNG; returns its path."""
    from megatron_ext import plots

    plots.bar_chart(path, title, [r["class"] for r in rows],
                    {"share of all tokens": [r["base_rate"] for r in rows],
                     "share of top tokens": [r["top_share"] for r in rows]},
                    "share", notes=[f"lift {r['lift']:.2f}" for r in rows])
    return path
