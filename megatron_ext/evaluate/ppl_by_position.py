"""ppl-by-position: next-token loss on held-out documents, per position bucket.

At each length L the windows are the first L tokens of the first ``num_samples`` documents that
have at least L tokens, in corpus order (shorter documents are skipped and counted). A window has
L - 1 predicted tokens: token t (1 <= t < L) predicted from tokens 0..t-1. ``loss`` is the mean over
every predicted token of every window - what ``transformers`` reports for ``labels=window`` - and
``buckets`` splits the same tokens by t into [0, b), [b, 2b), ... so a user sees whether late tokens,
with more context before them, are predicted better.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


def select_windows(corpus, length: int, num_samples: int) -> Tuple[List[np.ndarray], List[int], int]:
    """(windows, their document indices, documents skipped as shorter than ``length``)."""
    windows, documents, skipped = [], [], 0
    for index in range(len(corpus)):
        if len(windows) == num_samples:
            break
        if corpus.document_length(index) < length:
            skipped += 1
            continue
        windows.append(corpus.tokens(index)[:length])
        documents.append(index)
    return windows, documents, skipped


def default_bucket_size(lengths: Sequence[int]) -> int:
    """An eighth of the longest length (at least 64), shared by every length so buckets line up."""
    return max(64, max(lengths) // 8)


def summarize(losses: Sequence[np.ndarray], length: int, bucket_size: int) -> Dict[str, object]:
    """Mean loss over all predicted tokens and per bucket of the predicted token's position."""
    if not losses:
        return {"loss": None, "ppl": None, "tokens": 0, "buckets": []}
    stacked = np.stack([np.asarray(x, dtype=np.float64) for x in losses])  # [n, L - 1]
    positions = np.arange(1, length)  # position of the predicted token
    buckets = []
    for start in range(0, length, bucket_size):
        end = min(start + bucket_size, length)
        column = (positions >= start) & (positions < end)
        if not column.any():
            continue
        values = stacked[:, column]
        buckets.append({"start": start, "end": end, "loss": float(values.mean()),
                        "tokens": int(values.size)})
    loss = float(stacked.mean())
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(stacked.size), "buckets": buckets}


def run(runner, corpus, lengths: Sequence[int], num_samples: int, bucket_size: int,
        progress_factory: Optional[Callable[[str, int], Callable[[int], None]]] = None
        ) -> Dict[str, dict]:
    """``{str(L): {"loss": ..., "ppl": ..., "tokens": ..., "documents": ..., ...}}``."""
    out = {}
    for length in lengths:
        windows, documents, skipped = select_windows(corpus, length, num_samples)
        progress = progress_factory(f"ppl-by-position {length}", len(windows)) \
            if progress_factory else None
        losses = runner.token_losses(windows, progress)
        result = summarize(losses, length, bucket_size)
        result.update(documents=len(windows), document_indices=documents,
                      skipped_short=skipped, bucket_size=bucket_size,
                      per_document_loss=[float(np.mean(x)) for x in losses])
        out[str(length)] = result
    return out
