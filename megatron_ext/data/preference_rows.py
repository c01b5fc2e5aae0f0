"""One preference row: JSONL line -> validated row -> token ids (prompt segments, answers).

Accepted row shapes (extra keys are ignored; an optional "system" string goes before the user turn):
  {"prompt": str, "chosen": str, "rejected": [str, ...]}
  {"context": str | [str, ...], "question": str, "chosen": str, "rejected": [str, ...]}
  TRL pairs: "rejected" may be a single string (M = 1).
  TRL conversational: "prompt" is a list of {"role", "content"} messages (not ending with the
  assistant) and each answer is a string or a one-message list [{"role": "assistant", "content"}].
  "rejected" is then one such answer (M = 1) or a list of them (M >= 1), e.g.
  [[{"role": "assistant", "content": "a"}], "b"].

Tokenization. The prompt is rendered once with the user content replaced by a sentinel; the text
before it (template header) and after it (end of user turn + generation prompt) are tokenized on
their own, the content in between piece by piece, so the loader sees where each context chunk
ends (one prompt *segment* per chunk) without re-tokenizing:
  [head] [chunk 1] ... [chunk K] ["\n\n" + question + tail]     (context rows)
  [head] [prompt + tail]                                        (prompt rows)
  [rendered messages + generation prompt]                       (conversational prompts)
An answer is what the template adds after the generation prompt when the assistant message is
appended (content + end-of-turn), or, without a template, the answer's tokens plus EOD: the model
is scored on answering and on stopping.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_ext import jsonl
from megatron_ext.data.chat import ROLES, render
from megatron_ext.errors import UserError

# Reasons a row is rejected; --skip-bad-rows counts skipped rows per reason.
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
EMPTY_REJECTED = "empty_rejected_list"
ANSWER_TOO_LONG = "answer_too_long"
PROMPT_TOO_LONG = "prompt_too_long"
TEMPLATE = "chat_template"

# Stands in for the user content while the prompt is rendered; its two sides are the template's.
SENTINEL = "MEGATRONEXTUSERCONTENTSENTINEL"
CONTEXT_SEPARATOR = "\n\n"


class BadPreferenceRow(UserError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def preference_row_error(message: str, kind: str) -> BadPreferenceRow:
    """``jsonl.parse_object``'s errors, with the reason --skip-bad-rows counts them under."""
    return BadPreferenceRow(message, NOT_JSON if kind == "json" else NOT_OBJECT)


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    chosen: str
    rejected: Tuple[str, ...]
    system: Optional[str] = None
    prompt: Optional[str] = None                      # a plain prompt string
    messages: Optional[Tuple[Dict[str, str], ...]] = None  # a TRL conversational prompt
    context: Union[None, str, Tuple[str, ...]] = None
    question: Optional[str] = None


@dataclasses.dataclass
class TokenizedRow:
    segments: List[np.ndarray]   # prompt pieces, in order; their concatenation is the prompt
    chosen: np.ndarray
    rejected: List[np.ndarray]

    @property
    def prompt(self) -> np.ndarray:
        return np.concatenate(self.segments)


# --------------------------------------------------------------------------- #
# Parsing and validation
# --------------------------------------------------------------------------- #

def _text(value, where: str, label: str) -> str:
    """A non-empty string; ``label`` names the field or list item, e.g. "rejected[2]"."""
    if not isinstance(value, str):
        raise BadPreferenceRow(f"{where}: field {label!r} must be a string, got "
                               f"{type(value).__name__}", WRONG_TYPE)
    if not value.strip():
        raise BadPreferenceRow(f"{where}: field {label!r} is empty or whitespace only; give it "
                               "real text or drop the row", EMPTY_TEXT)
    return value


def _answer(value, where: str, label: str) -> str:
    """A string, or TRL's conversational answer: a list with one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) \
                or value[0].get("role") != "assistant":
            raise BadPreferenceRow(
                f"{where}: field {label!r} must be a string or a list with exactly one "
                "{\"role\": \"assistant\", \"content\": ...} message", WRONG_TYPE)
        return _text(value[0].get("content"), where, f"{label}.content")
    return _text(value, where, label)


def _rejected(value, where: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (_text(value, where, "rejected"),)
    if not isinstance(value, list):
        raise BadPreferenceRow(f"{where}: field 'rejected' must be a string or a list of "
                               f"answers, got {type(value).__name__}", WRONG_TYPE)
    if not value:
        raise BadPreferenceRow(f"{where}: field 'rejected' is an empty list; give at least one "
                               "rejected answer or drop the row", EMPTY_REJECTED)
    if all(isinstance(item, dict) for item in value):
        return (_answer(value, where, "rejected"),)  # one conversational answer
    return tuple(_answer(item, where, f"rejected[{i}]") for i, item in enumerate(value))


def _messages(value: list, where: str) -> Tuple[Dict[str, str], ...]:
    if not value:
        raise BadPreferenceRow(f"{where}: field 'prompt' is an empty list of messages",
                               EMPTY_TEXT)
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise BadPreferenceRow(
                f"{where}: field 'prompt[{i}]' must be an object with a 'role' in {ROLES} and a "
                f"string 'content', got {message!r:.120}", WRONG_TYPE)
    if value[-1]["role"] == "assistant":
        raise BadPreferenceRow(f"{where}: field 'prompt' ends with an assistant message; the "
                               "answers are the next assistant turn, so end it with the user",
                               WRONG_TYPE)
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def parse_row(line: str, where: str) -> PreferenceRow:
    """One JSONL line -> PreferenceRow; raises BadPreferenceRow naming ``where`` and the field."""
    row = jsonl.parse_object(line, where, preference_row_error,
                             "a JSON object with 'chosen' and 'rejected'")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise BadPreferenceRow(f"{where}: field {key!r} is missing; every row needs "
                                   "'chosen' (one answer) and 'rejected' (one or a list)",
                                   MISSING_FIELD)
    has_prompt, has_context = "prompt" in row, "context" in row or "question" in row
    if has_prompt == has_context:
        problem = "both are given" if has_prompt else "neither is given"
        raise BadPreferenceRow(f"{where}: field 'prompt': give either 'prompt' or 'context' + "
                               f"'question' ({problem})", MISSING_FIELD)
    fields = dict(chosen=_answer(row["chosen"], where, "chosen"),
                  rejected=_rejected(row["rejected"], where))
    if row.get("system") is not None:
        fields["system"] = _text(row["system"], where, "system")
    if has_prompt and isinstance(row["prompt"], list):
        messages = _messages(row["prompt"], where)
        if "system" in fields:
            if any(m["role"] == "system" for m in messages):
                raise BadPreferenceRow(f"{where}: field 'system' given twice (also as a message "
                                       "in 'prompt'); keep one", WRONG_TYPE)
            messages = ({"role": "system", "content": fields.pop("system")},) + messages
        return PreferenceRow(messages=messages, **fields)
    if has_prompt:
        return PreferenceRow(prompt=_text(row["prompt"], where, "prompt"), **fields)
    for key in ("context", "question"):
        if key not in row:
            raise BadPreferenceRow(f"{where}: field {key!r} is missing; rows with a context need "
                                   "both 'context' and 'question' (or use 'prompt')",
                                   MISSING_FIELD)
    context = row["context"]
    if isinstance(context, list):
        if not context:
            raise BadPreferenceRow(f"{where}: field 'context' is an empty list; give at least "
                                   "one chunk or use 'prompt'", EMPTY_TEXT)
        context = tuple(_text(chunk, where, f"context[{i}]")
                        for i, chunk in enumerate(context))
    else:
        context = _text(context, where, "context")
    question = _text(row["question"], where, "question")
    return PreferenceRow(context=context, question=question, **fields)


def user_content(row: PreferenceRow) -> str:
    """The user message a prompt or context row stands for."""
    if row.prompt is not None:
        return row.prompt
    chunks = row.context if isinstance(row.context, tuple) else (row.context,)
    return CONTEXT_SEPARATOR.join(chunks) + CONTEXT_SEPARATOR + row.question


def prompt_messages(row: PreferenceRow) -> List[Dict[str, str]]:
    if row.messages is not None:
        return list(row.messages)
    system = [{"role": "system", "content": row.system}] if row.system is not None else []
    return system + [{"role": "user", "content": user_content(row)}]


# --------------------------------------------------------------------------- #
# Tokenization
# --------------------------------------------------------------------------- #

def has_chat_template(tokenizer) -> bool:
    hf = getattr(tokenizer, "_tok", None)
    return hf is not None and getattr(hf, "chat_template", None) is not None


class RowTokenizer:
    """PreferenceRow -> TokenizedRow for one tokenizer and one set of limits."""

    def __init__(self, tokenizer, use_template: bool, context_chunk_tokens: int = 1024,
                 max_answer_tokens: int = 2048, max_prompt_tokens: Optional[int] = None):
        self.tokenizer = tokenizer
        self.use_template = use_template
        self.context_chunk_tokens = context_chunk_tokens
        self.max_answer_tokens = max_answer_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self._frames: Dict[Optional[str], Tuple[str, str]] = {}

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        return render(self.tokenizer, messages, add_generation_prompt, self.use_template)

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.tokenize(text) if text else [], dtype=np.int64)

    def _frame(self, system: Optional[str]) -> Tuple[str, str]:
        """(head, tail): the rendered prompt around the user content, per system message."""
        if system not in self._frames:
            if len(self._frames) >= 64:  # rows may each bring their own system message
                self._frames.clear()
            messages = ([{"role": "system", "content": system}] if system is not None else []) \
                + [{"role": "user", "content": SENTINEL}]
            rendered = self._render(messages, True)
            if rendered.count(SENTINEL) != 1:
                raise UserError("the chat template does not copy the user message verbatim into "
                                 "the prompt; use --no-chat-template")
            self._frames[system] = tuple(rendered.split(SENTINEL))
        return self._frames[system]

    def _with_bos(self, ids: np.ndarray) -> np.ndarray:
        bos = self.tokenizer.bos
        if bos is None or (len(ids) and ids[0] == bos):
            return ids
        return np.concatenate([np.asarray([bos], dtype=np.int64), ids])

    def _segments(self, row: PreferenceRow, where: str) -> Tuple[List[np.ndarray], str]:
        """Prompt token segments and the prompt text they stand for."""
        if row.messages is not None:
            text = self._render(row.messages, True)
            return [self._with_bos(self._ids(text))], text
        head, tail = self._frame(row.system)
        text = head + user_content(row) + tail
        if self.use_template and text != self._render(prompt_messages(row), True):
            field = "context" if row.prompt is None else "prompt"
            raise BadPreferenceRow(f"{where}: field {field!r}: "
                                   "the chat template rewrites the user message (e.g. trims "
                                   "surrounding whitespace); strip the text or use "
                                   "--no-chat-template", TEMPLATE)
        segments = [self._ids(head)]
        if row.prompt is not None:
            segments.append(self._ids(row.prompt + tail))
        elif isinstance(row.context, tuple):
            segments += [self._ids(chunk + CONTEXT_SEPARATOR) for chunk in row.context]
            segments.append(self._ids(row.question + tail))
        else:
            ids = self._ids(row.context)
            step = self.context_chunk_tokens
            segments += [ids[i:i + step] for i in range(0, len(ids), step)]
            segments.append(self._ids(CONTEXT_SEPARATOR + row.question + tail))
        segments = [s for s in segments if len(s)]
        segments[0] = self._with_bos(segments[0])
        return segments, text

    def _answer(self, messages: List[dict], prompt_text: str, answer: str, where: str,
                label: str) -> np.ndarray:
        if self.use_template:
            full = self._render(messages + [{"role": "assistant", "content": answer}], False)
            if not full.startswith(prompt_text):
                raise BadPreferenceRow(
                    f"{where}: field {label!r}: the chat template does not render the answer "
                    "after the generation prompt (the prompt changed when the answer was added); "
                    "use --no-chat-template", TEMPLATE)
            ids = self._ids(full[len(prompt_text):])
        else:
            ids = np.append(self._ids(answer), self.tokenizer.eod)
        if len(ids) > self.max_answer_tokens:
            raise BadPreferenceRow(f"{where}: field {label!r} is {len(ids)} tokens, more than "
                                   f"--max-answer-tokens {self.max_answer_tokens}; shorten it or "
                                   "raise the limit", ANSWER_TOO_LONG)
        return ids

    def __call__(self, row: PreferenceRow, where: str) -> TokenizedRow:
        segments, prompt_text = self._segments(row, where)
        length = sum(len(s) for s in segments)
        if self.max_prompt_tokens is not None and length > self.max_prompt_tokens:
            field = "prompt" if row.context is None else "context"
            raise BadPreferenceRow(f"{where}: field {field!r}: the prompt is {length} tokens, more "
                                   f"than --max-prompt-tokens {self.max_prompt_tokens}; shorten "
                                   "it or raise the limit", PROMPT_TOO_LONG)
        messages = prompt_messages(row)
        chosen = self._answer(messages, prompt_text, row.chosen, where, "chosen")
        label = "rejected" if len(row.rejected) == 1 else "rejected[{}]"
        rejected = [self._answer(messages, prompt_text, answer, where, label.format(i))
                    for i, answer in enumerate(row.rejected)]
        return TokenizedRow(segments, chosen, rejected)
