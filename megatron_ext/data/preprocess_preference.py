"""Preference JSONL -> Megatron IndexedDataset for LOGO / SimPO-style training.

Every kept row becomes ONE document of 2 + M sequences, in order

    [prompt, chosen, rejected_1, ..., rejected_M]

in ``{output_prefix}_preference_document.{bin,idx}``. Beside it, as for every dataset of this
project (``token_flags.py``), a uint8 ``..._tokenflags`` dataset with the same documents and
sequence lengths:
  prompt tokens  SEGMENT_END on the last token of every prompt segment (template header, each
                 context chunk, question + generation prompt); never TARGET.
  answer tokens  TARGET on every token; the document's very last token (end of the last rejected
                 answer) also carries DOCUMENT_END | SEGMENT_END.
and ``..._meta.json`` with "kind": "preference", the tokenizer, whether the chat template was used,
the row count, the range of M, the limits and the skipped rows per reason. Row shapes and how the
prompt is cut into segments: ``preference_rows.py``.

Rows are tokenized in worker processes in input order, so the bytes written do not depend on
``workers``. A bad row stops the run with file, line and field, unless the caller asks to skip
such rows, in which case each is counted under its reason and reported.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from megatron_ext.data import token_flags
from megatron_ext.data.preprocess import remove_quietly
from megatron_ext.data.preference_rows import (BadPreferenceRow, RowTokenizer, TokenizedRow,
                                               has_chat_template, parse_row)
from megatron_ext.data.tokenizer import build_tokenizer, token_dtype

KIND = "preference"


@dataclasses.dataclass
class PreferenceStats:
    rows: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    min_rejected: int = 0
    max_rejected: int = 0
    skipped: Dict[str, int] = dataclasses.field(default_factory=dict)
    chat_template: bool = False
    data_prefix: str = ""

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        rejected = (f"{self.min_rejected}" if self.min_rejected == self.max_rejected
                    else f"{self.min_rejected}-{self.max_rejected}")
        return (f"{self.rows} preference rows ({rejected} rejected each), {self.tokens} tokens "
                f"({self.answer_tokens} of them answers) written; chat template "
                f"{'used' if self.chat_template else 'not used'}; skipped "
                f"{sum(self.skipped.values())} rows" + (f" ({skipped})" if skipped else ""))


def data_prefix_for(output_prefix: str) -> str:
    return f"{output_prefix}_preference_document"


def document_arrays(row: TokenizedRow) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """(token ids, flags, sequence lengths) of the document a row is stored as."""
    answers = [row.chosen] + list(row.rejected)
    prompt_flags = []
    for segment in row.segments:
        flags = np.zeros(len(segment), dtype=np.uint8)
        flags[-1] = token_flags.SEGMENT_END
        prompt_flags.append(flags)
    answer_flags = [np.full(len(a), token_flags.TARGET, dtype=np.uint8) for a in answers]
    flags = np.concatenate(prompt_flags + answer_flags)
    flags[-1] |= token_flags.DOCUMENT_END | token_flags.SEGMENT_END
    ids = np.concatenate(list(row.segments) + answers)
    lengths = [sum(len(s) for s in row.segments)] + [len(a) for a in answers]
    return ids, flags, lengths


_WORKER: Dict[str, object] = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, use_template: bool,
                 limits: Dict[str, Optional[int]]) -> None:
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    _WORKER["tokenize"] = RowTokenizer(tokenizer, use_template, **limits)


def _process(item: Tuple[str, str]):
    """(where, line) -> (where, TokenizedRow or None, error message, error reason)."""
    where, line = item
    try:
        return where, _WORKER["tokenize"](parse_row(line, where), where), None, None
    except BadPreferenceRow as err:
        return where, None, str(err), err.reason


def _read_lines(paths: Sequence[str]) -> Iterator[Tuple[str, str]]:
    for path in paths:
        with open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{line_no}", line


def _check_options(inputs, context_chunk_tokens, max_answer_tokens, max_prompt_tokens, workers):
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path}: no such file")
    for flag, value in (("--context-chunk-tokens", context_chunk_tokens),
                        ("--max-answer-tokens", max_answer_tokens), ("--workers", workers),
                        ("--max-prompt-tokens", 1 if max_prompt_tokens is None
                         else max_prompt_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")


def preprocess_preference(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    chat_template: bool = True,
    workers: int = 1,
    skip_bad_rows: bool = False,
    context_chunk_tokens: int = 1024,
    max_answer_tokens: int = 2048,
    max_prompt_tokens: Optional[int] = None,
    progress: bool = True,
) -> PreferenceStats:
    _check_options(inputs, context_chunk_tokens, max_answer_tokens, max_prompt_tokens, workers)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    use_template = chat_template and has_chat_template(tokenizer)
    if chat_template and not use_template:
        print(f"note: --tokenizer-model {tokenizer_model} has no chat template; prompts are "
              "rendered as plain 'Role: content' blocks (meta records chat_template=false)",
              file=sys.stderr)
    limits = dict(context_chunk_tokens=context_chunk_tokens, max_answer_tokens=max_answer_tokens,
                  max_prompt_tokens=max_prompt_tokens)
    prefix = data_prefix_for(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    outputs = {"tokens": prefix, "flags": token_flags.flags_prefix(prefix)}
    tmp = f".tmp{os.getpid()}"  # per process: concurrent runs never share a half-written file
    builders = {
        "tokens": IndexedDatasetBuilder(prefix + ".bin" + tmp,
                                        dtype=token_dtype(tokenizer.vocab_size)),
        "flags": IndexedDatasetBuilder(outputs["flags"] + ".bin" + tmp, dtype=np.uint8)}
    stats = PreferenceStats(chat_template=use_template, data_prefix=prefix)
    rejected_counts = []
    init_args = (tokenizer_type, tokenizer_model, use_template, limits)
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_process, _read_lines(inputs), chunksize=4)
        else:
            _init_worker(*init_args)
            results = map(_process, _read_lines(inputs))
        for where, row, error, reason in tqdm(results, desc="tokenizing", unit="row",
                                              disable=not progress):
            if error is not None:
                if not skip_bad_rows:
                    raise BadPreferenceRow(error + " (or pass --skip-bad-rows to count and skip "
                                           "such rows)", reason)
                stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
                continue
            ids, flags, lengths = document_arrays(row)
            builders["tokens"].add_document(ids, lengths)
            builders["flags"].add_document(flags, lengths)
            stats.rows += 1
            stats.tokens += len(ids)
            stats.answer_tokens += len(ids) - lengths[0]
            rejected_counts.append(len(row.rejected))
        if stats.rows == 0:
            raise ValueError(f"no preference rows in {', '.join(inputs)} could be used "
                             f"(skipped per reason: {stats.skipped}); nothing written")
    except BaseException:
        if pool is not None:
            pool.terminate()
        for name, builder in builders.items():
            builder.data_file.close()
            remove_quietly(outputs[name] + ".bin" + tmp)
        raise
    if pool is not None:
        pool.close()
        pool.join()
    stats.min_rejected, stats.max_rejected = min(rejected_counts), max(rejected_counts)
    for name, builder in builders.items():
        builder.finalize(outputs[name] + ".idx" + tmp)
    token_flags.write_meta(prefix, {
        "kind": KIND, "tokenizer_type": tokenizer_type, "tokenizer_model": str(tokenizer_model),
        "chat_template": use_template, "rows": stats.rows,
        "min_rejected": stats.min_rejected, "max_rejected": stats.max_rejected,
        "context_chunk_tokens": context_chunk_tokens, "max_answer_tokens": max_answer_tokens,
        "max_prompt_tokens": max_prompt_tokens, "skipped": dict(sorted(stats.skipped.items())),
        "tokens": stats.tokens})
    # .idx last: a prefix whose .idx exists is complete (flags first, then the tokens).
    for name in ("flags", "tokens"):
        os.replace(outputs[name] + ".bin" + tmp, outputs[name] + ".bin")
        os.replace(outputs[name] + ".idx" + tmp, outputs[name] + ".idx")
    return stats


def read_preference_rows(data_prefix: str) -> List[Dict[str, object]]:
    """Every row of a preference dataset, as written (for inspection and tests):
    {"prompt", "segments", "chosen", "rejected"} with numpy token arrays, read the way training
    reads them (``PreferenceRows``)."""
    from megatron_ext.data.preference_samples import PreferenceRows

    data = PreferenceRows(data_prefix)
    rows = []
    for index, answers in enumerate(data.answers_per_row()):
        row = data.row(index, num_rejected=int(answers) - 1)
        rows.append({"prompt": row.prompt,
                     "segments": np.split(row.prompt, np.cumsum(row.segment_lengths)[:-1]),
                     "chosen": row.answers[0],
                     "rejected": row.answers[1:]})
    return rows
