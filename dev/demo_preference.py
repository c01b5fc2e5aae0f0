"""A small real-text preference set, built offline from the six Austen novels.

LOGO-style long-context retrieval: each row's context is K real passages (consecutive sentences of
one novel, about ``chunk_chars`` characters each) drawn from all novels and shuffled; the question
quotes one sentence of one passage and asks for the sentence that comes right after it. The
chosen answer is that next sentence; the rejected answers are wrong retrievals: sentences at the
same relative place in the OTHER passages of the context, and neighbours of the right sentence in
its own passage (the one before the quote, the one after the answer). Everything is real text, and
the rows depend only on the arguments (seed included).
"""

from __future__ import annotations

import functools
import json
import random
import re
from typing import Dict, List, Tuple

from dev import assets
from megatron_ext.errors import UserError

QUESTION = 'In the references, which sentence comes right after: "{quoted}"?'
MIN_SENTENCE_CHARS, MAX_SENTENCE_CHARS = 20, 300
_ATTEMPTS_PER_ROW = 1000

# Words whose trailing period does not end a sentence in these novels.
_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Messrs", "Dr", "St", "Col", "Capt", "Gen", "Lt", "Esq",
                            "Rev", "No", "viz", "etc", "i.e", "e.g"})
# End punctuation (plus closing quotes/brackets), whitespace, then what can start a sentence.
_BOUNDARY = re.compile(r"[.!?]+[\"'’”)]*(?=\s+[\"'‘“(_]?[A-Z])")

# A passage: (novel id, its sentences in novel order, the text the context shows).
Passage = Tuple[str, Tuple[str, ...], str]


def split_sentences(paragraph: str) -> List[str]:
    """Sentences of one whitespace-normalised paragraph; together they spell it, space-joined."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(paragraph):
        words = paragraph[start:match.start()].split()
        last_word = words[-1].lstrip("\"'‘“(_") if words else ""
        if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isupper()):
            continue  # "Mr. Knightley", initials
        sentences.append(paragraph[start:match.end()])
        start = match.end() + 1  # the single space after it
    sentences.append(paragraph[start:])
    return [s for s in sentences if s]


def _is_heading(paragraph: str) -> bool:
    """Titles, chapter headings, 'THE END': not prose, so passages never run across them."""
    return not re.search(r"[a-z]", paragraph) or (
        len(paragraph) < 40 and not paragraph.endswith((".", "!", "?", '"', "'")))


def novel_passages(novel_id: str, text: str, chunk_chars: int) -> List[Passage]:
    """Cut a novel into consecutive passages of at least ``chunk_chars`` characters (the tail of a
    run of prose shorter than half that is left out). Paragraph breaks show as newlines."""
    passages: List[Passage] = []
    sentences: List[str] = []
    pieces: List[str] = []  # the passage text: paragraphs (or parts) joined by newlines

    def close(min_chars: int) -> None:
        if sentences and sum(len(p) for p in pieces) >= min_chars:
            passages.append((novel_id, tuple(sentences), "\n".join(pieces)))
        sentences.clear()
        pieces.clear()

    for raw in re.split(r"\n\s*\n", text):
        paragraph = " ".join(raw.split())
        if not paragraph:
            continue
        if _is_heading(paragraph):
            close(chunk_chars // 2)
            continue
        part: List[str] = []
        for sentence in split_sentences(paragraph):
            sentences.append(sentence)
            part.append(sentence)
            if sum(len(p) + 1 for p in pieces) + len(" ".join(part)) >= chunk_chars:
                pieces.append(" ".join(part))
                part = []
                close(chunk_chars)
        if part:
            pieces.append(" ".join(part))
    close(chunk_chars // 2)
    return passages


@functools.lru_cache(maxsize=4)
def austen_passages(chunk_chars: int) -> Tuple[Passage, ...]:
    passages: List[Passage] = []
    with open(assets.corpus_jsonl("austen"), encoding="utf-8") as f:
        for line in f:
            novel = json.loads(line)
            passages += novel_passages(novel["id"], novel["text"], chunk_chars)
    return tuple(passages)


def _usable(sentence: str) -> bool:
    return MIN_SENTENCE_CHARS <= len(sentence) <= MAX_SENTENCE_CHARS


def _wrong_retrievals(gold: Passage, index: int, others: List[Passage], rng: random.Random
                      ) -> List[str]:
    """Candidate rejected answers, alternating between the two kinds of mistakes."""
    sentences = gold[1]
    neighbours = [sentences[j] for j in (index - 1, index + 2) if 0 <= j < len(sentences)]
    elsewhere = []
    for _, other, _ in others:
        # The sentence after the same relative position in another passage.
        j = min(int(index / len(sentences) * len(other)) + 1, len(other) - 1)
        elsewhere.append(other[j])
    rng.shuffle(neighbours)
    rng.shuffle(elsewhere)
    mixed = [s for pair in zip(elsewhere, neighbours) for s in pair]
    longer = elsewhere if len(elsewhere) > len(neighbours) else neighbours
    return mixed + longer[min(len(elsewhere), len(neighbours)):]


def _try_row(passages, num_chunks: int, num_rejected: int, rng: random.Random):
    picked = [passages[i] for i in rng.sample(range(len(passages)), num_chunks)]
    gold, others = picked[0], picked[1:]
    rng.shuffle(picked)
    context = [p[2] for p in picked]
    joined = "\n\n".join(context)
    sentences = gold[1]
    # The quote must point at one place only: it occurs once in the whole context.
    candidates = [i for i in range(len(sentences) - 1)
                  if _usable(sentences[i]) and _usable(sentences[i + 1])
                  and joined.count(sentences[i]) == 1]
    if not candidates:
        return None
    index = rng.choice(candidates)
    chosen = sentences[index + 1]
    rejected: List[str] = []
    for sentence in _wrong_retrievals(gold, index, others, rng):
        if _usable(sentence) and sentence != chosen and sentence not in rejected \
                and sentence != sentences[index]:
            rejected.append(sentence)
    if len(rejected) < num_rejected:
        return None
    return {"context": context, "question": QUESTION.format(quoted=sentences[index]),
            "chosen": chosen, "rejected": rejected[:num_rejected], "source": gold[0]}


def make_preference_rows(num_rows: int = 64, num_chunks: int = 8, chunk_chars: int = 2000,
                         num_rejected: int = 2, seed: int = 0) -> List[Dict]:
    """Rows for tools/preprocess_preference.py: {"context": [K passages], "question", "chosen",
    "rejected": [M sentences], "source": novel id}."""
    for flag, value, least in (("--num-rows", num_rows, 1), ("--num-chunks", num_chunks, 1),
                               ("--num-rejected", num_rejected, 1),
                               ("--chunk-chars", chunk_chars, 200)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    passages = austen_passages(chunk_chars)
    if num_chunks > len(passages):
        raise UserError(f"--num-chunks {num_chunks}: the novels give only {len(passages)} "
                         f"passages of --chunk-chars {chunk_chars}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < num_rows:
        for _ in range(_ATTEMPTS_PER_ROW):
            row = _try_row(passages, num_chunks, num_rejected, rng)
            if row is not None:
                rows.append(row)
                break
        else:
            raise UserError(f"could not find {num_rejected} distinct wrong retrievals for a row "
                             f"in {_ATTEMPTS_PER_ROW} tries; raise --num-chunks or --chunk-chars, "
                             "or lower --num-rejected")
    return rows
