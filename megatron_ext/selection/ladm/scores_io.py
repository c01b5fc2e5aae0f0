"""Reading documents and writing score files (append-only, resumable after a crash).

Input: JSON lines, one object per document, carrying either ``text`` (``--text-key``, tokenized
with the scorer's tokenizer) or a pre-tokenized ``input_ids`` list used as is. The document id
is the ``--id-key`` field (default ``id``) or, when a row has none, ``line<N>`` (1-based line
number); ids must be unique. The domain is the dotted ``--domain-key`` path, e.g.
``meta.pile_set_name``. A malformed row is an error naming the file, line and field: a scoring run
is long, so every row is checked before the model is loaded.

Output: one JSON object per scored document. Rows are written whole and flushed per batch;
a rerun skips ids already present and drops a partial last line left by a killed run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Set, Tuple

from megatron_ext import jsonl
from megatron_ext.errors import UserError


class InputError(UserError):
    """Bad input; the message names the file, line or flag at fault and how to fix it."""


@dataclass
class Document:
    line: int            # 1-based line number in the input file
    index: int           # 0-based row index (decides the shard)
    doc_id: str
    domain: Optional[str]
    text: Optional[str] = None
    input_ids: Optional[List[int]] = None


@dataclass
class InputScan:
    num_rows: int = 0
    text_rows: int = 0
    shard_rows: int = 0
    ids: Set[str] = field(default_factory=set)


def dotted_get(row: dict, path: str) -> Tuple[bool, Any]:
    """``row['meta']['pile_set_name']`` for path ``meta.pile_set_name``; (found, value)."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def document_id(row: dict, id_key: str, number: int, where: str) -> str:
    """The row's ``id_key`` value as a string, or ``line<number>`` when it has none."""
    raw_id = row.get(id_key)
    if raw_id is None:
        return f"line{number}"
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        return str(raw_id)
    raise InputError(f"{where}: id field {id_key!r} (--id-key) must be a string or an integer, "
                     f"got {type(raw_id).__name__}")


def input_error(message: str, kind: str) -> "InputError":
    return InputError(message + ("; every line must be one JSON object" if kind == "json" else ""))


def parse_json_row(line: str, where: str) -> dict:
    return jsonl.parse_object(line, where, input_error)


def parse_document(line: str, number: int, index: int, path: str, text_key: str,
                   domain_key: Optional[str], id_key: str,
                   vocab_size: Optional[int] = None) -> Document:
    where = f"{path} line {number}"
    row = parse_json_row(line, where)
    doc_id = document_id(row, id_key, number, where)

    domain = None
    if domain_key:
        found, value = dotted_get(row, domain_key)
        if not found or value is None:
            raise InputError(f"{where}: no field {domain_key!r} (--domain-key); add it to every "
                             "row or leave --domain-key out")
        domain = value if isinstance(value, str) else json.dumps(value)

    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise InputError(f"{where}: 'input_ids' must be a list of non-negative integers")
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise InputError(f"{where}: 'input_ids' holds token {max(ids)}, outside the model's "
                             f"vocabulary of {vocab_size}; tokenize with the scoring model's "
                             "tokenizer")
        return Document(number, index, doc_id, domain, input_ids=ids)
    text = row.get(text_key)
    if text is None:
        raise InputError(f"{where}: neither {text_key!r} (--text-key) nor 'input_ids'; every "
                         "row needs one of them")
    if not isinstance(text, str):
        raise InputError(f"{where}: {text_key!r} (--text-key) must be a string, got "
                         f"{type(text).__name__}")
    return Document(number, index, doc_id, domain, text=text)


def read_documents(path: str, text_key: str = "text", domain_key: Optional[str] = None,
                   id_key: str = "id", vocab_size: Optional[int] = None,
                   num_shards: int = 1, shard_index: int = 0) -> Iterator[Document]:
    """Documents of one shard (row index % num_shards == shard_index), in file order."""
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if index % num_shards != shard_index:
                continue
            if not line.strip():
                raise InputError(f"{path} line {index + 1}: empty line; remove it")
            yield parse_document(line, index + 1, index, path, text_key, domain_key, id_key,
                                 vocab_size)


def scan_input(path: str, text_key: str = "text", domain_key: Optional[str] = None,
               id_key: str = "id", vocab_size: Optional[int] = None, num_shards: int = 1,
               shard_index: int = 0) -> InputScan:
    """Check every row of the file (all shards: ids must be unique across them) up front."""
    if not os.path.isfile(path):
        raise InputError(f"--input {path}: no such file")
    scan = InputScan()
    first_line = {}
    for doc in read_documents(path, text_key, domain_key, id_key, vocab_size):
        if doc.doc_id in first_line:
            raise InputError(f"{path} line {doc.line}: duplicate id {doc.doc_id!r} (first on "
                             f"line {first_line[doc.doc_id]}); ids (--id-key {id_key!r}) must "
                             "be unique")
        first_line[doc.doc_id] = doc.line
        scan.num_rows += 1
        scan.text_rows += doc.text is not None
        scan.shard_rows += doc.index % num_shards == shard_index
    scan.ids = set(first_line)
    return scan


def recover_output(path: str, settings: dict) -> Tuple[Set[str], int]:
    """Ids already scored in ``path`` and the bytes of a partial last line dropped from it.

    A killed run can leave a last line without its newline: it is cut off so that appended rows
    start on a fresh line. Any complete line must be a row written with the same settings.
    """
    def accept(row, number: int) -> None:
        if not isinstance(row, dict) or row.get("settings") != settings:
            found = row.get("settings") if isinstance(row, dict) else row
            raise InputError(f"--output {path} line {number} was written with other "
                             f"settings ({found}) than this run ({settings}); resume with "
                             "the same settings or choose a new --output")

    def damaged(number: int) -> Exception:
        return InputError(f"--output {path} line {number} is not valid JSON; the file "
                          "is damaged before its last line: move it away and rescore")

    rows, dropped = jsonl.recover_appended(path, accept, damaged)
    return {str(row["id"]) for row in rows}, dropped


# Score files are appended one flushed batch at a time (a kill loses at most one batch).
ScoreWriter = jsonl.AppendWriter
