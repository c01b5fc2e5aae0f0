"""Needle-in-a-haystack prompts (passkey; RULER-style single and multi-key NIAH) from real text.

Every sample is ONE token sequence of exactly the requested length, answer last:

    [chat head] instruction | filler ... needle(s) ... filler | question [chat tail] answer-prefix | answer

* The filler is a contiguous run of real text from the evaluation corpus (documents joined by a
  blank line when one is too short), never random tokens.
* The needle to retrieve sits at the requested depth of the context (0 = right after the
  instruction, 1 = right before the question), moved to the nearest sentence end within 1% of the
  context (at least 8 tokens) so it reads as its own sentence; multi-key distractors (other keys,
  other values) go to random sentence ends first, so they do not shift the target's depth.
* With the answer at the end, one forward pass scores greedy decoding of the answer: see
  ``model_runner.ModelRunner.greedy_answers``.

Each sample is a pure function of (corpus, tokenizer, task, length, depth, sample index, seed):
the random generator is seeded from exactly those, so one length's haystacks do not change when
other lengths or depths are requested.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron_ext.evaluate.corpus import CorpusError
from megatron_ext.errors import UserError

SENTENCE_ENDS = (".", "!", "?", "\n", '."', '!"', '?"', ".'", "!'", "?'")
_KEY_WORD = re.compile(r"\b[a-z]{6,12}\b")


@dataclasses.dataclass(frozen=True)
class NeedleTemplate:
    """Texts of one task. ``{key}`` / ``{value}`` are filled per needle."""

    instruction: str
    needle: str
    question: str
    answer_prefix: str  # after the question (plain) or after the assistant header (chat)
    value_digits: int
    num_needles: int = 1  # > 1: multi-key, the others are distractors with their own keys
    keyed: bool = True  # passkey needs no key


# The passkey task of Mohtashami & Jaggi (2023); NIAH texts as in RULER (Hsieh et al., 2024),
# niah_single_2 / niah_multikey_1 (essay-like haystack, word keys, 7-digit values).
TEMPLATES: Dict[str, NeedleTemplate] = {
    "passkey": NeedleTemplate(
        instruction="There is an important info hidden inside a lot of irrelevant text. Find it "
                    "and memorize it. I will quiz you about the important information there.\n\n",
        needle=" The pass key is {value}. Remember it. {value} is the pass key.",
        question="\n\nWhat is the pass key?",
        answer_prefix="The pass key is",
        value_digits=5, keyed=False),
    "niah": NeedleTemplate(
        instruction="Some special magic numbers are hidden within the following text. Make sure "
                    "to memorize it. I will quiz you about the numbers afterwards.\n\n",
        needle=" One of the special magic numbers for {key} is: {value}.",
        question="\n\nWhat is the special magic number for {key} mentioned in the provided text?",
        answer_prefix="The special magic number for {key} mentioned in the provided text is",
        value_digits=7),
    "niah-multikey": NeedleTemplate(
        instruction="Some special magic numbers are hidden within the following text. Make sure "
                    "to memorize it. I will quiz you about the numbers afterwards.\n\n",
        needle=" One of the special magic numbers for {key} is: {value}.",
        question="\n\nWhat is the special magic number for {key} mentioned in the provided text?",
        answer_prefix="The special magic number for {key} mentioned in the provided text is",
        value_digits=7, num_needles=4),
}
NEEDLE_TASKS = tuple(TEMPLATES)
MIN_FILLER_TOKENS = 16


@dataclasses.dataclass
class HaystackSample:
    task: str
    length: int
    depth: float  # requested
    index: int
    tokens: np.ndarray  # int64 [length]
    answer: str  # the value, e.g. "68423"
    answer_start: int  # the answer tokens are tokens[answer_start:]
    needle_start: int  # the target needle is tokens[needle_start:needle_start + needle_length]
    needle_length: int
    needle_text: str
    context_start: int  # filler + needles are tokens[context_start:context_end]
    context_end: int
    filler_source: Tuple[int, int]  # (document, first token) the filler was cut from

    @property
    def answer_tokens(self) -> np.ndarray:
        return self.tokens[self.answer_start:]

    @property
    def actual_depth(self) -> float:
        """Where the target needle ended up: 0 = context start, 1 = context end."""
        room = self.context_end - self.context_start - self.needle_length
        return (self.needle_start - self.context_start) / room if room > 0 else 0.0


def sample_seed(seed: int, task: str, length: int, depth: float, index: int) -> List[int]:
    """Entropy for one sample's generator; stable across runs, processes and Python versions."""
    return [seed, zlib.crc32(task.encode()), length, int(round(depth * 1_000_000)), index]


class HaystackBuilder:
    """Builds samples for the tasks in ``TEMPLATES`` from ``corpus`` (an ``EvalCorpus``)."""

    def __init__(self, corpus, tokenizer, seed: int, chat_template: bool = False):
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seed = seed
        self.chat_template = chat_template
        self._ends_sentence: Dict[int, bool] = {}
        self._head, self._tail = self._chat_frame() if chat_template else ("", "")
        self._separator = np.asarray(tokenizer.tokenize("\n\n"), dtype=np.int64)
        self._eod = getattr(tokenizer, "eod", None)

    # -- texts -----------------------------------------------------------------------------

    def _chat_frame(self) -> Tuple[str, str]:
        """(text before, text after) the user message in the tokenizer's chat template, ending
        with the assistant's generation prompt."""
        marker = "\x00CONTEXT\x00"
        try:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                                      tokenize=False, add_generation_prompt=True)
        except (NotImplementedError, ValueError) as err:
            raise CorpusError(f"--chat-template: the tokenizer has no chat template ({err}); "
                              f"drop --chat-template or use a HuggingFaceTokenizer folder with "
                              f"one") from None
        if not isinstance(text, str) or text.count(marker) != 1:
            raise CorpusError("--chat-template: the tokenizer's chat template did not render the "
                              "user message once; drop --chat-template")
        head, tail = text.split(marker)
        return head, tail

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.tokenize(text), dtype=np.int64)

    def _continuation(self, before: str, text: str) -> np.ndarray:
        """Tokens of ``text`` as they read after ``before`` (SentencePiece would otherwise add
        its dummy-prefix space to a piece encoded on its own)."""
        whole, head = self._encode(before + text), self._encode(before)
        if len(whole) > len(head) and np.array_equal(whole[:len(head)], head):
            return whole[len(head):]
        return self._encode(text)

    def _prompt_texts(self, template: NeedleTemplate, key: str) -> Tuple[str, str]:
        """(text before the context, text after it up to the answer)."""
        head = self._head + template.instruction
        prefix = template.answer_prefix.format(key=key)
        if self.chat_template:
            tail = template.question.format(key=key) + self._tail + prefix
        else:
            tail = template.question.format(key=key) + " " + prefix
        return head, tail

    # -- randomness from the corpus -------------------------------------------------------

    def _document_tokens(self, index: int) -> np.ndarray:
        tokens = self.corpus.tokens(index)
        return tokens[tokens != self._eod] if self._eod is not None else tokens

    def _filler(self, count: int, rng: np.random.Generator) -> Tuple[np.ndarray, Tuple[int, int]]:
        """``count`` contiguous tokens of real text starting at a random place of the corpus."""
        n_docs = len(self.corpus)
        doc = int(rng.integers(n_docs))
        tokens = self._document_tokens(doc)
        start = int(rng.integers(0, max(1, len(tokens) - count + 1)))
        parts, have = [tokens[start:start + count]], min(count, max(0, len(tokens) - start))
        nxt = doc
        for _ in range(n_docs):
            if have >= count:
                break
            nxt = (nxt + 1) % n_docs
            more = np.concatenate([self._separator, self._document_tokens(nxt)])
            parts.append(more[:count - have])
            have += len(parts[-1])
        if have < count:
            raise CorpusError(f"{self.corpus.flag} {self.corpus.path} holds fewer than {count} "
                              f"tokens of text, too few for the haystack; use a larger corpus or "
                              f"shorter --lengths")
        return np.concatenate(parts), (doc, start)

    def _key_words(self, count: int, rng: np.random.Generator) -> List[str]:
        """Distinct lowercase words (6-12 letters) read from a random place of the corpus."""
        words: List[str] = []
        for _ in range(50):
            span, _ = self._filler(400, rng)
            for word in _KEY_WORD.findall(self.tokenizer.detokenize(span.tolist())):
                if word not in words:
                    words.append(word)
            if len(words) >= 4 * count:
                break
        if len(words) < count:
            raise CorpusError(f"{self.corpus.flag} {self.corpus.path}: found only {len(words)} "
                              f"distinct words of 6-12 lowercase letters for NIAH keys; use an "
                              f"English text corpus")
        picked = rng.choice(len(words), size=count, replace=False)
        return [words[i] for i in picked]

    @staticmethod
    def _values(template: NeedleTemplate, count: int, rng: np.random.Generator) -> List[str]:
        low, high = 10 ** (template.value_digits - 1), 10 ** template.value_digits
        values: List[str] = []
        while len(values) < count:
            value = str(int(rng.integers(low, high)))
            if value not in values:
                values.append(value)
        return values

    # -- placement -------------------------------------------------------------------------

    def _is_sentence_end(self, token: int) -> bool:
        if token not in self._ends_sentence:
            text = self.tokenizer.detokenize([int(token)]).rstrip(" ")
            self._ends_sentence[token] = text.endswith(SENTENCE_ENDS)
        return self._ends_sentence[token]

    def snap_to_sentence_end(self, tokens: np.ndarray, position: int) -> int:
        """The insertion point nearest ``position`` that follows a sentence end (or a context
        edge), searched within ``snap_window``; ``position`` itself when none is found."""
        window = self.snap_window(len(tokens))
        for offset in range(window + 1):
            for candidate in (position - offset, position + offset):
                if 0 <= candidate <= len(tokens) and (
                        candidate in (0, len(tokens)) or self._is_sentence_end(tokens[candidate - 1])):
                    return candidate
        return position

    @staticmethod
    def snap_window(context_tokens: int) -> int:
        return max(8, context_tokens // 100)

    # -- building --------------------------------------------------------------------------

    def build(self, task: str, length: int, depth: float, index: int) -> HaystackSample:
        if task not in TEMPLATES:
            raise ValueError(f"unknown needle task {task!r}; expected one of {NEEDLE_TASKS}")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is outside [0, 1]")
        template = TEMPLATES[task]
        rng = np.random.default_rng(sample_seed(self.seed, task, length, depth, index))
        keys = self._key_words(template.num_needles, rng) if template.keyed \
            else [""] * template.num_needles
        values = self._values(template, template.num_needles, rng)
        needle_texts = [template.needle.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        # Needles follow a sentence end, the question follows corpus text.
        needles = [self._continuation(".", t) for t in needle_texts]
        head_text, tail_text = self._prompt_texts(template, keys[0])
        head, tail = self._encode(head_text), self._continuation(".", tail_text)
        answer = self._continuation(tail_text, " " + values[0])
        filler_count = length - len(head) - len(tail) - len(answer) - sum(map(len, needles))
        if filler_count < MIN_FILLER_TOKENS:
            needed = length - filler_count + MIN_FILLER_TOKENS
            raise UserError(f"--lengths {length} is too short for {task}: its prompt, needles "
                             f"and answer take {length - filler_count} tokens; use lengths of at "
                             f"least {needed}")
        context, source = self._filler(filler_count, rng)
        # Distractors first (random sentence ends), then the target at its depth of the result.
        for needle in needles[1:]:
            at = self.snap_to_sentence_end(context, int(rng.integers(0, len(context) + 1)))
            context = np.concatenate([context[:at], needle, context[at:]])
        at = self.snap_to_sentence_end(context, int(round(depth * len(context))))
        context = np.concatenate([context[:at], needles[0], context[at:]])
        tokens = np.concatenate([head, context, tail, answer])
        assert len(tokens) == length, (len(tokens), length)
        return HaystackSample(
            task=task, length=length, depth=depth, index=index, tokens=tokens, answer=values[0],
            answer_start=length - len(answer), needle_start=len(head) + at,
            needle_length=len(needles[0]), needle_text=needle_texts[0],
            context_start=len(head), context_end=len(head) + len(context), filler_source=source)

    def build_all(self, task: str, length: int, depths: Sequence[float], num_samples: int
                  ) -> List[HaystackSample]:
        return [self.build(task, length, depth, i) for depth in depths for i in range(num_samples)]


def depth_tolerance(sample: HaystackSample) -> float:
    """How far ``actual_depth`` may be from the requested depth (the snapping window)."""
    context = sample.context_end - sample.context_start - sample.needle_length
    return HaystackBuilder.snap_window(context) / max(context, 1)
