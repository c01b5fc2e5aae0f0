"""JSONL text -> Megatron IndexedDataset (.bin/.idx), one dataset per JSON key.

Output naming follows Megatron-LM's tools/preprocess_data.py: ``{prefix}_{key}_document.{bin,idx}``.
Rows are tokenized in worker processes in input order, so the output is deterministic whatever
``workers`` is. Malformed rows stop the run with the file and line number, unless the caller asks to
skip them, in which case every skipped row is counted and reported; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from megatron_ext.data.tokenizer import build_tokenizer, token_dtype


class MalformedRow(ValueError):
    pass


@dataclasses.dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    skipped_malformed: int = 0
    skipped_empty: int = 0
    outputs: Tuple[str, ...] = ()

    def summary(self) -> str:
        return (f"{self.documents} documents, {self.tokens} tokens written; skipped "
                f"{self.skipped_malformed} malformed and {self.skipped_empty} empty rows")


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
    """One JSONL line -> {key: text}; raises MalformedRow naming the location and the problem."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise MalformedRow(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise MalformedRow(f"{where}: expected a JSON object, got {type(row).__name__}")
    texts = {}
    for key in json_keys:
        value = _lookup(row, key)
        if not isinstance(value, str):
            found = "missing" if value is None else f"a {type(value).__name__}"
            raise MalformedRow(f"{where}: field {key!r} (from --json-keys) is {found}, expected a string")
        texts[key] = value
    return texts


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_type: str, tokenizer_model: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(tokenizer_type, tokenizer_model)


def _tokenize_texts(item: Tuple[int, Optional[dict], Optional[str], bool]):
    line_no, texts, error, append_eod = item
    if texts is None:
        return line_no, None, error
    out = {}
    for key, text in texts.items():
        ids = _WORKER_TOKENIZER.tokenize(text)
        if append_eod and ids:
            ids = list(ids) + [_WORKER_TOKENIZER.eod]
        out[key] = ids
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
) -> PreprocessStats:
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = token_dtype(tokenizer.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    prefixes = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    tmp = f".tmp{os.getpid()}"  # per process: concurrent runs never share a half-written file
    builders = {key: IndexedDatasetBuilder(prefixes[key] + ".bin" + tmp, dtype=dtype) for key in json_keys}
    stats = PreprocessStats()
    rows = _read_rows(inputs, json_keys, append_eod)
    try:
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer_type, tokenizer_model))
            results = pool.imap(_tokenize_texts, rows, chunksize=16)
        else:
            pool = None
            _init_worker(tokenizer_type, tokenizer_model)
            results = map(_tokenize_texts, rows)
        for line_no, token_lists, error in tqdm(results, desc="tokenizing", unit="doc",
                                                disable=not progress):
            if error is not None:
                if not skip_malformed:
                    raise MalformedRow(error + " (pass --skip-malformed to count and skip such rows)")
                stats.skipped_malformed += 1
                continue
            if any(len(ids) == 0 for ids in token_lists.values()):
                stats.skipped_empty += 1
                continue
            for key, ids in token_lists.items():
                builders[key].add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
                stats.tokens += len(ids)
            stats.documents += 1
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        for key, builder in builders.items():
            builder.data_file.close()
            _remove_quietly(prefixes[key] + ".bin" + tmp)
        raise
    for key, builder in builders.items():
        builder.finalize(prefixes[key] + ".idx" + tmp)
        # .idx last: a prefix whose .idx exists is complete.
        os.replace(prefixes[key] + ".bin" + tmp, prefixes[key] + ".bin")
        os.replace(prefixes[key] + ".idx" + tmp, prefixes[key] + ".idx")
    stats.outputs = tuple(prefixes.values())
    return stats


def _remove_quietly(path: str) -> None:
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
