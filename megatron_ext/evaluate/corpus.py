"""The evaluation corpus (``--eval-data``) as token arrays, one per document.

Two inputs, told apart by what exists on disk:
  PATH.jsonl (or any file)   JSON rows with a ``text`` field, tokenized on first use (no special
                             tokens, the way tools/preprocess_data.py tokenizes)
  PREFIX                     a Megatron indexed dataset, PREFIX.bin + PREFIX.idx (already tokens)

Rows whose ``text`` is empty are skipped and counted (``skipped_empty``); a row that is not a JSON
object with a string ``text`` is an error naming the file and line. Documents are read in file
order and cached once tokenized, so several tasks share the tokenization work.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from megatron_ext import jsonl
from megatron_ext.errors import UserError


class CorpusError(UserError):
    """Unusable --eval-data; the message names the file (and line) and the fix."""


class EvalCorpus:
    def __init__(self, path: str, tokenizer, flag: str = "--eval-data"):
        self.path = path
        self.flag = flag
        self._tokenizer = tokenizer
        self._cache: Dict[int, np.ndarray] = {}
        self.skipped_empty = 0
        self._texts: Optional[List[str]] = None
        self._indexed = None
        if os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx"):
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            self._indexed = IndexedDataset(path)
            self.kind = "indexed"
            count = len(self._indexed)
        elif os.path.isfile(path):
            self._texts = self._read_jsonl(path)
            self.kind = "jsonl"
            count = len(self._texts)
        else:
            raise CorpusError(f"{flag} {path}: neither a jsonl file nor an indexed-dataset prefix "
                              f"({path}.bin + {path}.idx); pass a jsonl with 'text' rows or a "
                              f"prefix written by tools/preprocess_data.py")
        if count == 0:
            raise CorpusError(f"{flag} {path} holds no documents"
                              + (f" ({self.skipped_empty} rows with empty text)"
                                 if self.skipped_empty else ""))

    def _read_jsonl(self, path: str) -> List[str]:
        texts = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = jsonl.parse_object(
                    line, f"{self.flag} {path}:{line_no}",
                    lambda message, kind: CorpusError(
                        message + ("; each line must be an object with a 'text' field"
                                   if kind == "json" else "")),
                    "an object with a string 'text' field")
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise CorpusError(f"{self.flag} {path}:{line_no}: expected an object with a "
                                      f"string 'text' field, got {type(row).__name__}"
                                      f"{' with keys ' + str(sorted(row)) if isinstance(row, dict) else ''}")
                if not text:
                    self.skipped_empty += 1
                    continue
                texts.append(text)
        return texts

    def __len__(self) -> int:
        return len(self._indexed) if self._indexed is not None else len(self._texts)

    def tokens(self, index: int) -> np.ndarray:
        """Document ``index`` as int64 token ids (cached)."""
        if index not in self._cache:
            if self._indexed is not None:
                ids = np.array(self._indexed[index], dtype=np.int64)  # copy out of the mmap
            else:
                ids = np.asarray(self._tokenizer.tokenize(self._texts[index]), dtype=np.int64)
            self._cache[index] = ids
        return self._cache[index]

    def document_length(self, index: int) -> int:
        if self._indexed is not None:
            return int(self._indexed.sequence_lengths[index])
        return len(self.tokens(index))
