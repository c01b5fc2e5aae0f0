"""Per-token annotations recorded at preprocessing time, next to the tokens.

The loader must not re-tokenize to find sentences, documents or instruction spans, so
``tools/preprocess_data.py`` writes, for every ``{prefix}.bin/.idx``, a token-aligned uint8
indexed dataset ``{prefix}_tokenflags.bin/.idx`` (same documents, same lengths) and a small
``{prefix}_meta.json`` saying what kind of data it is. Bits:

  SEGMENT_END   a segment (sentence, or code line) ends after this token: where LongRecipe may
                open a position gap.
  DOCUMENT_END  the last token of a document (also a segment end): packed-document boundaries that
                do not depend on the EOD token (chat tokenizers reuse it as the end-of-turn token).
  TARGET        the token may be a training target (SFT: assistant tokens; pretraining: all).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from megatron_ext.errors import UserError

SEGMENT_END = 1
DOCUMENT_END = 2
TARGET = 4

SEGMENT_UNITS = ("sentence", "line")
_CLOSERS = "\"')]}»”’"
FORMAT = "megatron_ext.tokens/1"


def flags_prefix(data_prefix: str) -> str:
    return f"{data_prefix}_tokenflags"


def meta_path(data_prefix: str) -> str:
    return f"{data_prefix}_meta.json"


def ends_segment(piece: str, unit: str) -> bool:
    """Whether a token whose text is ``piece`` closes a segment of the given unit."""
    if "\n" in piece:
        return True
    if unit == "line":
        return False
    stripped = piece.rstrip().rstrip(_CLOSERS)
    return stripped.endswith((".", "!", "?"))


def segment_end_table(tokenizer, unit: str) -> np.ndarray:
    """Boolean lookup over the vocabulary: does this token close a sentence (or line)?

    Decided once per token id from its decoded text, so any tokenizer works (SentencePiece byte
    pieces, byte-level BPE) and documents are flagged with one vectorised lookup.
    """
    if unit not in SEGMENT_UNITS:
        raise UserError(f"--segment-unit {unit!r}: expected one of {SEGMENT_UNITS}")
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    for token_id in range(tokenizer.vocab_size):
        table[token_id] = ends_segment(tokenizer.detokenize([token_id]), unit)
    return table


def document_flags(ids: np.ndarray, table: np.ndarray, targets: Optional[np.ndarray] = None
                   ) -> np.ndarray:
    """Flags for one document's tokens; ``targets`` (bool per token) defaults to all True."""
    ids = np.asarray(ids, dtype=np.int64)
    flags = np.where(table[ids], SEGMENT_END, 0).astype(np.uint8)
    if len(flags):
        flags[-1] |= SEGMENT_END | DOCUMENT_END
    if targets is None:
        flags |= TARGET
    else:
        flags[np.asarray(targets, dtype=bool)] |= TARGET
    return flags


def write_meta(data_prefix: str, meta: Dict) -> None:
    path = meta_path(data_prefix)
    with open(path + ".tmp", "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=2)
    os.replace(path + ".tmp", path)


def read_meta(data_prefix: str) -> Optional[Dict]:
    """The preprocessing record of a dataset, or None for files written by other tools."""
    try:
        with open(meta_path(data_prefix)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def has_flags(data_prefix: str) -> bool:
    prefix = flags_prefix(data_prefix)
    return os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin")
