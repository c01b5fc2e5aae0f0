"""JSONL text -> Megatron IndexedDataset (.bin/.idx), one dataset per JSON key.

Output naming follows Megatron-LM's tools/preprocess_data.py: ``{prefix}_{key}_document.{bin,idx}``.
Next to each, a token-aligned ``..._tokenflags`` dataset records sentence/line ends, document ends
and (for chat rows) which tokens are assistant targets, and ``..._meta.json`` records the kind of
data (``text`` or ``chat``); see ``token_flags.py``. A field holding a string is text; a field
holding a list of ``{"role", "content"}`` messages is a conversation rendered with the
tokenizer's chat template.
Rows are tokenized in worker processes in input order, so the output is deterministic whatever
``workers`` is. Malformed rows stop the run with the file and line number, unless the caller asks to
skip them, in which case every skipped row is counted and reported; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from megatron_ext import jsonl
from megatron_ext.data import token_flags
from megatron_ext.data.chat import ChatFormatError, check_messages, tokenize_conversation
from megatron_ext.data.tokenizer import build_tokenizer, token_dtype
from megatron_ext.errors import UserError


class MalformedRow(UserError):
    pass


@dataclasses.dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    skipped_malformed: int = 0
    skipped_empty: int = 0
    target_tokens: int = 0
    kind: str = "text"
    outputs: Tuple[str, ...] = ()

    def summary(self) -> str:
        targets = (f" ({self.target_tokens} of them assistant targets)" if self.kind == "chat"
                   else "")
        return (f"{self.documents} documents ({self.kind}), {self.tokens} tokens{targets} written; "
                f"skipped {self.skipped_malformed} malformed and {self.skipped_empty} empty rows")


def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def _lookup(row: dict, dotted_key: str):
    value = row
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_row(line: str, json_keys: Sequence[str], where: str) -> dict:
    """One JSONL line -> {key: text or messages}; raises MalformedRow naming the location and the
    problem."""
    row = jsonl.parse_object(line, where, lambda message, kind: MalformedRow(message))
    texts = {}
    for key in json_keys:
        value = _lookup(row, key)
        if isinstance(value, list):
            try:
                check_messages(value, f"{where}: field {key!r}")
            except ChatFormatError as err:
                raise MalformedRow(str(err)) from None
        elif not isinstance(value, str):
            found = "missing" if value is None else f"a {type(value).__name__}"
            raise MalformedRow(f"{where}: field {key!r} (from --json-keys) is {found}, expected a "
                               "string or a list of chat messages")
        texts[key] = value
    return texts


def kind_of(value) -> str:
    return "chat" if isinstance(value, list) else "text"


_WORKER = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, segment_unit: str,
                 chat_template: bool) -> None:
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    _WORKER.update(tokenizer=tokenizer, chat_template=chat_template,
                   segment_ends=token_flags.segment_end_table(tokenizer, segment_unit))


def _tokenize_texts(item: Tuple[int, Optional[dict], Optional[str], bool]):
    """-> (line, {key: (ids, flags, kind)}, error)."""
    line_no, texts, error, append_eod = item
    if texts is None:
        return line_no, None, error
    tokenizer = _WORKER["tokenizer"]
    out = {}
    for key, value in texts.items():
        if isinstance(value, list):
            try:
                ids, targets = tokenize_conversation(tokenizer, value, _WORKER["chat_template"])
            except (ChatFormatError, ValueError) as err:
                return line_no, None, f"line {line_no}: field {key!r}: {err}"
        else:
            ids, targets = tokenizer.tokenize(value), None
        if append_eod and ids:
            ids = list(ids) + [tokenizer.eod]
            # A conversation's closing EOD is a target only if its last turn was the assistant's.
            targets = None if targets is None else targets + [targets[-1]]
        ids = np.asarray(ids, dtype=np.int64)
        out[key] = (ids, token_flags.document_flags(ids, _WORKER["segment_ends"], targets),
                    kind_of(value))
    return line_no, out, None


def _read_rows(paths: Sequence[str], json_keys: Sequence[str], append_eod: bool) -> Iterator:
    for path in paths:
        with open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    yield line_no, parse_row(line, json_keys, where), None, append_eod
                except MalformedRow as err:
                    yield line_no, None, str(err), append_eod


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_malformed: bool = False,
    progress: bool = True,
    segment_unit: str = "sentence",
    chat_template: bool = True,
) -> PreprocessStats:
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = token_dtype(tokenizer.vocab_size)
    if segment_unit not in token_flags.SEGMENT_UNITS:
        raise UserError(f"--segment-unit {segment_unit!r}: expected one of "
                         f"{token_flags.SEGMENT_UNITS}")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    prefixes = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    # Token files and their flag files, written and published together.
    outputs = {**{(key, "tokens"): prefixes[key] for key in json_keys},
               **{(key, "flags"): token_flags.flags_prefix(prefixes[key]) for key in json_keys}}
    tmp = f".tmp{os.getpid()}"  # per process: concurrent runs never share a half-written file
    builders = {name: IndexedDatasetBuilder(prefix + ".bin" + tmp,
                                            dtype=dtype if name[1] == "tokens" else np.uint8)
                for name, prefix in outputs.items()}
    stats = PreprocessStats()
    kinds = {}
    rows = _read_rows(inputs, json_keys, append_eod)
    init_args = (tokenizer_type, tokenizer_model, segment_unit, chat_template)
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_tokenize_texts, rows, chunksize=16)
        else:
            pool = None
            _init_worker(*init_args)
            results = map(_tokenize_texts, rows)
        for line_no, token_lists, error in tqdm(results, desc="tokenizing", unit="doc",
                                                disable=not progress):
            if error is not None:
                if not skip_malformed:
                    raise MalformedRow(error + " (pass --skip-malformed to count and skip such rows)")
                stats.skipped_malformed += 1
                continue
            if any(len(ids) == 0 for ids, _, _ in token_lists.values()):
                stats.skipped_empty += 1
                continue
            for key, (ids, flags, kind) in token_lists.items():
                if kinds.setdefault(key, kind) != kind:
                    # One dataset is either pretraining text or conversations, never both.
                    raise MalformedRow(f"line {line_no}: field {key!r} is {kind} but earlier rows "
                                       f"were {kinds[key]}; preprocess them separately")
                builders[(key, "tokens")].add_document(ids, [len(ids)])
                builders[(key, "flags")].add_document(flags, [len(flags)])
                stats.tokens += len(ids)
                stats.target_tokens += int((flags & token_flags.TARGET).astype(bool).sum())
            stats.documents += 1
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        for name, builder in builders.items():
            builder.data_file.close()
            remove_quietly(outputs[name] + ".bin" + tmp)
        raise
    for name, builder in builders.items():
        builder.finalize(outputs[name] + ".idx" + tmp)
    for key in json_keys:
        stats.kind = kinds.get(key, "text")
        token_flags.write_meta(prefixes[key], {
            "kind": stats.kind, "segment_unit": segment_unit, "append_eod": append_eod,
            "tokenizer_type": tokenizer_type, "tokenizer_model": str(tokenizer_model),
            "chat_template": chat_template, "documents": stats.documents})
    # .idx last: a prefix whose .idx exists is complete (flags first, then the tokens).
    for name in sorted(outputs, key=lambda n: n[1] == "tokens"):
        os.replace(outputs[name] + ".bin" + tmp, outputs[name] + ".bin")
        os.replace(outputs[name] + ".idx" + tmp, outputs[name] + ".idx")
    stats.outputs = tuple(prefixes.values())
    return stats


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_documents(prefix: str) -> List[np.ndarray]:
    """All documents of an indexed dataset (for inspection and tests)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    # Copies: the dataset's arrays are views of an mmap that closes with it.
    return [np.array(ds[i]) for i in range(len(ds))]
