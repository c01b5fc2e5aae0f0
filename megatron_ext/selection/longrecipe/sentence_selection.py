"""Impactful-sentence selection (LongRecipe §4.1): short samples that stand for long windows.

Each document is split into sentences (or lines, for code), then into windows of at most
``target_seq_length`` (T) tokens made of whole sentences (ceil(D / T) windows of about equal size,
so no short tail window is left over). Each window becomes one sample of at most
n = round(budget_ratio * T) tokens:

  1. sentences containing a word of a ``keep_classes`` class (numerals, by default) are taken
     first, in random order, each one that still fits the budget;
  2. the remaining budget is filled with the other sentences, in random order, each one that
     still fits;
  3. the taken sentences are written in their original order, unchanged.

So a window with fewer impactful tokens than the budget keeps all of them plus a random share of
the rest, and one with more keeps a random subset of its impactful sentences (an impactful
sentence is left out only if it was longer than the budget left when its turn came; shorter
other sentences may then fill the remainder). The budget is
checked on the final text with the training tokenizer; sentences are dropped (last taken first) in
the rare case that tokenizing the joined text gives more tokens than the per-sentence counts.

Unlike the released LongRecipe code, the budget is drawn from the whole document (it filtered only
the first 24k tokens and discarded the rest), and every output row carries its own sentences'
character spans in the source (no positions kept in a separate, reorderable list). Selection is
deterministic from (seed, input line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.selection.longrecipe import token_classes as tc
from megatron_ext.errors import UserError

SENTENCES, LINES = "sentence", "line"  # as preprocess_data.py's --segment-unit
# Words whose trailing period does not end a sentence ("Mr. Knightley").
ABBREVIATIONS = frozenset("""
mr mrs ms dr st jr sr prof rev gen col capt lt sgt hon messrs mme mlle vs etc e.g i.e cf al fig
no vol ch pp ed esp approx
""".split())
_CLOSERS = "\"')]}”’»"
_WHITESPACE_RUN = re.compile(r"\s+")


class SelectionError(UserError):
    """Bad input; the message names the flag, file or row."""


# ------------------------------------------------------------------------------------------
# Sentence splitting
# ------------------------------------------------------------------------------------------

def _ends_sentence(text: str, end: int) -> bool:
    """Does text[:end] end with sentence punctuation (. ! ?, then closing quotes/brackets)?"""
    i = end
    while i > 0 and text[i - 1] in _CLOSERS:
        i -= 1
    if i == 0 or text[i - 1] not in ".!?":
        return False
    if text[i - 1] == ".":
        j = i - 1
        while j > 0 and (text[j - 1].isalpha() or text[j - 1] == "."):
            j -= 1
        if text[j:i - 1].lower() in ABBREVIATIONS:
            return False
    return True


def split_sentences(text: str, unit: str = SENTENCES,
                    wrapped_lines: bool = False) -> List[Tuple[int, int]]:
    """Character spans that cover ``text`` exactly, one per sentence (or line).

    Boundaries are the paper's delimiters ". ! ? \\n": a sentence ends after . ! ? (and closing
    quotes or brackets) followed by whitespace, and at a newline. With ``wrapped_lines`` (books
    with hard line breaks) only blank lines and punctuation end sentences; ``unit="line"`` ends
    segments at newlines only (code). The whitespace between two sentences starts the second, so
    any selection of sentences joins with the spacing of the source (no "end.Next" when the
    sentence in between is dropped), and byte-level BPE tokenizers, which attach a space to the
    following word, count each sentence as they count it in context.
    """
    if unit not in (SENTENCES, LINES):
        raise SelectionError(f"unknown segment unit {unit!r}; use {SENTENCES} or {LINES}")
    needed_newlines = 2 if (wrapped_lines and unit == SENTENCES) else 1
    boundaries = []
    for m in _WHITESPACE_RUN.finditer(text):
        run = m.group()
        if m.end() == len(text):
            break  # trailing whitespace stays with the last sentence
        if run.count("\n") >= needed_newlines or (unit == SENTENCES
                                                   and _ends_sentence(text, m.start())):
            boundaries.append(m.start())
    cuts = [0] + [b for b in boundaries if 0 < b < len(text)] + [len(text)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


# ------------------------------------------------------------------------------------------
# Windows and selection
# ------------------------------------------------------------------------------------------

def windows(lengths: Sequence[int], target: int) -> List[range]:
    """Consecutive sentence ranges of about equal token count, each <= ``target``: with R tokens
    left, the next window aims at R / ceil(R / target) tokens, and sentence i starts a new window
    when its middle passes that goal or it would push the window past ``target``. Only a single
    sentence longer than ``target`` makes a longer window."""
    def goal(remaining: int) -> float:
        return remaining / max(1, math.ceil(remaining / target))

    remaining = int(sum(lengths))
    aim = goal(remaining)
    out: List[range] = []
    start, running = 0, 0
    for i, length in enumerate(lengths):
        if i > start and (running + length > target or running + length / 2 > aim):
            out.append(range(start, i))
            remaining -= running
            start, running, aim = i, 0, goal(remaining)
        running += length
    out.append(range(start, len(lengths)))
    return out


def select_in_window(window: range, lengths: Sequence[int], impactful: Sequence[bool],
                     budget: int, rng: np.random.Generator) -> List[int]:
    """Sentence indices taken, in the order taken: impactful sentences first, then the rest,
    each group in random order, every sentence that still fits the budget."""
    first = [i for i in window if impactful[i]]
    rest = [i for i in window if not impactful[i]]
    rng.shuffle(first)
    rng.shuffle(rest)
    taken, used = [], 0
    for i in first + rest:
        if used + lengths[i] <= budget:
            taken.append(i)
            used += lengths[i]
    return taken


@dataclasses.dataclass
class SelectionStats:
    docs_in: int = 0
    docs_out: int = 0           # documents that produced at least one sample
    docs_empty: int = 0
    docs_too_short: int = 0     # whole document within the budget: nothing to select
    samples: int = 0
    windows_too_short: int = 0  # windows of a longer document that fit the budget as they are
    tokens_in: int = 0
    tokens_too_short: int = 0   # tokens of skipped documents and windows
    tokens_out: int = 0
    sentences_in: int = 0
    sentences_out: int = 0
    impactful_in: int = 0
    impactful_out: int = 0
    sentences_over_budget: int = 0  # single sentences longer than the budget: never selectable
    windows_unselectable: int = 0  # windows made only of such sentences
    budget_repairs: int = 0     # sentences dropped because the joined text tokenized longer

    def summary(self) -> str:
        def pct(a, b):
            return f"{100 * a / b:.1f}%" if b else "-"

        return "\n".join([
            f"documents: {self.docs_in} in, {self.docs_out} used, {self.docs_too_short} too short "
            f"(<= budget, {self.tokens_too_short} tokens with short windows), {self.docs_empty} "
            "empty",
            f"samples: {self.samples} written, {self.windows_too_short} windows too short, "
            f"{self.windows_unselectable} windows of sentences longer than the budget",
            f"tokens (per-sentence counts): {self.tokens_in} in, {self.tokens_out} out "
            f"({pct(self.tokens_out, self.tokens_in)})",
            f"sentences: {self.sentences_out} of {self.sentences_in} kept "
            f"({pct(self.sentences_out, self.sentences_in)}); impactful: {self.impactful_out} of "
            f"{self.impactful_in} kept ({pct(self.impactful_out, self.impactful_in)})",
            f"sentences longer than the budget (never kept): {self.sentences_over_budget}; "
            f"budget repairs: {self.budget_repairs}",
        ])


class SentenceSelector:
    """Turns documents into budgeted samples (see the module docstring)."""

    def __init__(self, tokenize: Optional[Callable[[str], List[int]]], target_seq_length: int,
                 budget_ratio: float = 0.3, keep_classes: Sequence[str] = (tc.NUMERALS,),
                 unit: str = SENTENCES, wrapped_lines: bool = False, seed: int = 1234):
        if target_seq_length < 2:
            raise SelectionError(f"--target-seq-length must be >= 2, got {target_seq_length}")
        if not 0 < budget_ratio < 1:
            raise SelectionError(f"--budget-ratio must be in (0, 1), got {budget_ratio}")
        unknown = [c for c in keep_classes if c not in tc.WORD_CLASSES]
        if unknown or not keep_classes:
            raise SelectionError(f"--keep-classes {','.join(keep_classes)}: unknown "
                                 f"{', '.join(unknown) or '(empty)'}; choose from "
                                 f"{', '.join(tc.WORD_CLASSES)}")
        if unit not in (SENTENCES, LINES):
            raise SelectionError(f"--segment-unit {unit!r}: use {SENTENCES} or {LINES}")
        self.tokenize = tokenize
        self.target = target_seq_length
        self.budget = max(1, round(budget_ratio * target_seq_length))
        self.keep_classes = frozenset(keep_classes)
        self.unit, self.wrapped_lines, self.seed = unit, wrapped_lines, seed
        self.stats = SelectionStats()

    def _is_impactful(self, sentence: str) -> bool:
        return bool(tc.classes_in(sentence) & self.keep_classes)

    def _fit(self, text: str, spans: List[Tuple[int, int]], taken: List[int]
             ) -> Tuple[List[int], int]:
        """Sentences in source order, dropping the last taken while the joined text tokenizes
        over the budget; (kept, tokens)."""
        taken = list(taken)
        while True:
            kept = sorted(taken)
            tokens = len(self.tokenize("".join(text[spans[i][0]:spans[i][1]] for i in kept)))
            if tokens <= self.budget or not taken:
                return kept, tokens
            taken.pop()
            self.stats.budget_repairs += 1

    def samples(self, text: str, doc_id: str, row: int) -> Iterator[dict]:
        st = self.stats
        st.docs_in += 1
        if not text.strip():
            st.docs_empty += 1
            return
        spans = split_sentences(text, self.unit, self.wrapped_lines)
        lengths = [len(self.tokenize(text[s:e])) for s, e in spans]
        impactful = [self._is_impactful(text[s:e]) for s, e in spans]
        total = sum(lengths)
        st.tokens_in += total
        st.sentences_in += len(spans)
        st.impactful_in += sum(impactful)
        st.sentences_over_budget += sum(length > self.budget for length in lengths)
        if total <= self.budget:
            st.docs_too_short += 1
            st.tokens_too_short += total
            return
        rng = np.random.default_rng([self.seed, row])
        used = False
        for k, window in enumerate(windows(lengths, self.target)):
            window_tokens = sum(lengths[i] for i in window)
            if window_tokens <= self.budget:
                st.windows_too_short += 1
                st.tokens_too_short += window_tokens
                continue
            taken = select_in_window(window, lengths, impactful, self.budget, rng)
            kept, tokens = self._fit(text, spans, taken)
            if not kept:  # every sentence of the window is longer than the budget
                st.windows_unselectable += 1
                continue
            used = True
            n_impactful = sum(impactful[i] for i in kept)
            st.samples += 1
            st.tokens_out += tokens
            st.sentences_out += len(kept)
            st.impactful_out += n_impactful
            yield {
                "text": "".join(text[spans[i][0]:spans[i][1]] for i in kept),
                "source_id": doc_id, "source_row": row, "window": k,
                "tokens": tokens, "budget": self.budget, "window_tokens": window_tokens,
                "window_span": [spans[window.start][0], spans[window.stop - 1][1]],
                "sentences_kept": len(kept), "sentences_total": len(window),
                "impactful_kept": n_impactful,
                "impactful_total": sum(impactful[i] for i in window),
                "source_spans": [list(spans[i]) for i in kept],
            }
        st.docs_out += int(used)


def select_file(input_path: str, output_path: str, selector: SentenceSelector,
                text_key: str = "text", id_key: str = "id", progress: bool = True
                ) -> SelectionStats:
    """Read jsonl documents, write one jsonl row per sample; returns the counts."""
    from tqdm import tqdm

    from megatron_ext.selection.longrecipe.impactful_tokens import AnalysisError, read_documents

    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise SelectionError("--output must differ from --input")
    tmp = output_path + ".partial"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            rows = read_documents(input_path, text_key, id_key)
            for line_no, doc_id, text in tqdm(rows, desc="selecting", unit="doc",
                                              disable=not progress):
                for sample in selector.samples(text, doc_id, line_no):
                    out.write(json.dumps(sample, ensure_ascii=False) + "\n")
    except AnalysisError as err:
        os.remove(tmp)
        raise SelectionError(str(err)) from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, output_path)
    return selector.stats


def tokenizer_counter(tokenizer_type: str, tokenizer_model: str) -> Callable[[str], List[int]]:
    """The tokenize function of the tokenizer ``tools/preprocess_data.py`` uses."""
    from megatron_ext.data.tokenizer import build_tokenizer

    if not os.path.exists(tokenizer_model):
        raise SelectionError(f"--tokenizer-model {tokenizer_model}: no such file or folder")
    try:
        return build_tokenizer(tokenizer_type, tokenizer_model).tokenize
    except (ValueError, OSError) as err:
        raise SelectionError(f"--tokenizer-model {tokenizer_model} ({tokenizer_type}): "
                             f"{err}") from None


def parse_classes(text: Optional[str]) -> List[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]
