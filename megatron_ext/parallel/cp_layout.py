"""Which tokens of a sequence each context-parallel (CP) rank holds, and slicing batches to match.

Megatron's load-balanced layout: the sequence is cut into ``2 * cp_size`` equal chunks and rank
``r`` holds chunks ``r`` and ``2 * cp_size - 1 - r``. Under a causal mask early chunks see few keys
and late chunks many, so pairing an early chunk with a late one gives every rank the same work.

Everything here is a pure function of (sequence length, CP size, CP rank): every batch entry that
is per-token (tokens, labels, loss mask, position ids, document ids, ...) is sliced with the same
indices, and the attention module uses the same indices to know where its tokens sit globally.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch

from megatron_ext.parallel.layout import Layout

Array = Union[torch.Tensor, np.ndarray]
BatchT = TypeVar("BatchT", bound=Mapping)


def check_cp_divisible(seq_len: int, cp_size: int) -> None:
    """The layout needs ``2 * cp_size`` equal chunks; the error names the flags to change."""
    Layout(cp=cp_size).check_sequence(seq_len)


def _check_rank(cp_size: int, cp_rank: int) -> None:
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"CP rank {cp_rank} is outside the CP group of size {cp_size}")


def cp_chunk_spans(seq_len: int, cp_size: int, cp_rank: int) -> List[Tuple[int, int]]:
    """(global start, length) of each contiguous run of tokens this rank holds, in local order.

    CP=1 holds the whole sequence as one run (no divisibility requirement then).
    """
    check_cp_divisible(seq_len, cp_size)
    _check_rank(cp_size, cp_rank)
    if cp_size == 1:
        return [(0, seq_len)]
    chunk = seq_len // (2 * cp_size)
    return [(cp_rank * chunk, chunk), ((2 * cp_size - 1 - cp_rank) * chunk, chunk)]


def cp_token_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions (LongTensor [seq_len / cp_size]) of this rank's tokens, in local order."""
    spans = cp_chunk_spans(seq_len, cp_size, cp_rank)
    return torch.cat([torch.arange(start, start + length) for start, length in spans])


def cp_gathered_indices(seq_len: int, cp_size: int) -> torch.Tensor:
    """Global positions of the tokens after an all-gather of every rank's slice (rank order)."""
    return torch.cat([cp_token_indices(seq_len, cp_size, r) for r in range(cp_size)])


def _sequence_length(batch: Mapping[str, object], seq_dim: int) -> int:
    """The batch's sequence length: from ``tokens`` if present, else the first per-token entry."""
    if "tokens" in batch and _is_array(batch["tokens"]):
        return batch["tokens"].shape[seq_dim]
    for value in batch.values():
        if _is_array(value) and value.ndim > seq_dim:
            return value.shape[seq_dim]
    raise ValueError("batch has no per-token entry to slice for context parallelism")


def _is_array(value: object) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _take(value: Array, indices: torch.Tensor, seq_dim: int) -> Array:
    if isinstance(value, np.ndarray):
        return np.take(value, indices.numpy(), axis=seq_dim)
    return value.index_select(seq_dim, indices.to(value.device))


def slice_for_cp(batch: BatchT, cp_size: int, cp_rank: int, seq_dim: int = 1) -> Dict[str, object]:
    """This CP rank's part of a batch: every per-token entry sliced with the same indices.

    Per-token entries are tensors / numpy arrays with at least ``seq_dim + 1`` dimensions
    (``[b, s]`` for the default ``seq_dim=1``); all of them must have the sequence length of
    ``tokens``, so position ids or masks of the wrong length are an error rather than a silent misalignment.
    Lower-dimensional entries (per-sample scalars) and non-arrays pass through unchanged.

    Compute anything that needs the whole sequence (document ids from EOD tokens, position ids)
    BEFORE slicing: a rank only sees two chunks.
    """
    seq_len = _sequence_length(batch, seq_dim)
    indices = cp_token_indices(seq_len, cp_size, cp_rank)
    sliced = {}
    for key, value in batch.items():
        if not (_is_array(value) and value.ndim > seq_dim):
            sliced[key] = value
            continue
        if value.shape[seq_dim] != seq_len:
            raise ValueError(
                f"batch entry {key!r} has shape {tuple(value.shape)}, but tokens have sequence "
                f"length {seq_len} along dim {seq_dim}: every per-token entry (labels, loss_mask, "
                f"position_ids, document_ids, ...) must match the tokens")
        sliced[key] = value if cp_size == 1 else _take(value, indices, seq_dim)
    return sliced


def merge_cp_slices(parts: Sequence[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of slicing: every rank's slice (in rank order) -> the sequence in global order."""
    cp_size = len(parts)
    gathered = torch.cat(list(parts), dim=seq_dim)
    seq_len = gathered.shape[seq_dim]
    order = cp_gathered_indices(seq_len, cp_size).to(gathered.device)
    full = torch.empty_like(gathered)
    full.index_copy_(seq_dim, order, gathered)
    return full


def document_ids_from_eod(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """Document index of each token in a packed ``[b, s]`` batch (an EOD ends its own document).

    Run on the full sequence before ``slice_for_cp``: a rank's slice alone cannot count the EOD
    tokens that precede it.
    """
    is_eod = (tokens == eod_token).long()
    # The EOD token itself belongs to the document it closes: count EODs strictly before a token.
    return torch.cumsum(is_eod, dim=-1) - is_eod
