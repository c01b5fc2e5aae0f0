"""Training samples: Megatron-Core's GPTDataset plus what long-context recipes add to a sample.

GPTDataset cuts the token stream into ``seq_length + 1`` windows (tokens, labels, loss mask). This
subclass reads the same window of the token-aligned flags file (``token_flags.py``) through the
very same document/sample/shuffle indices, and then:

  packed documents  document ids and per-document positions from the recorded document ends
                    (EOD tokens when a dataset has no flags file); targets across a document end
                    are masked. With a skip-wise scheme each document (each piece of one, where a
                    window cuts it) gets its own ids over [0, T), as if it were trained alone.
  position scheme   contiguous, pose or longrecipe ids (``position_schemes.py``), drawn from a
                    generator seeded by (seed, dataset, sample index): every TP/CP rank and every
                    rerun computes the same ids. Without packing, one set of ids spans the whole
                    window (only with --positions-across-documents: the window may hold several
                    unrelated documents).
  sft               loss only on assistant tokens (conversations preprocessed from chat rows).

Everything stays a function of the sample index, so resuming needs no loader state.
"""

from __future__ import annotations

import dataclasses
import types
import zlib
from typing import Dict, Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data import position_schemes, token_flags
from megatron_ext.errors import UserError


@dataclasses.dataclass
class SampleConfig(GPTDatasetConfig):
    position_scheme: str = "contiguous"
    target_seq_length: Optional[int] = None  # None: the sample length (no spreading)
    pose_num_chunks: int = 2
    longrecipe_contiguous_prefix: bool = False
    packed_documents: bool = False
    sft: bool = False
    # "stream": Megatron's windows cut from the concatenated documents; "whole": every window
    # holds whole documents (whole_documents.py); a longer document is cut or refused.
    document_packing: str = "stream"
    overlong_documents: str = "truncate"


class AnnotatedGPTDataset(GPTDataset):
    config: SampleConfig

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                 config: SampleConfig):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                         config)
        self.flags = self._open_flags(dataset_path, indexed_dataset)
        self.meta = token_flags.read_meta(dataset_path) or {}
        if config.position_scheme == "longrecipe" and self.flags is None:
            raise UserError(
                f"--position-scheme longrecipe needs the sentence boundaries recorded at "
                f"preprocessing, but {dataset_path} has no {token_flags.flags_prefix(dataset_path)}"
                ".bin/.idx; re-run tools/preprocess_data.py on its source jsonl")
        if config.sft and self.meta.get("kind") != "chat":
            raise UserError(
                f"--objective sft trains on assistant turns of chat data, but {dataset_path} holds "
                f"{self.meta.get('kind', 'data without a _meta.json record')}; preprocess jsonl "
                "rows with a 'messages' field (tools/preprocess_data.py --json-keys messages)")
        # Plain contiguous pretraining reads no flags: it costs what GPTDataset costs.
        self._needs_flags = self.flags is not None and (
            config.position_scheme == "longrecipe" or config.packed_documents or config.sft)
        # Keeps two datasets of a blend (or two splits) from drawing the same random positions.
        self._stream = zlib.crc32(self.unique_description_hash.encode())

    @staticmethod
    def _open_flags(dataset_path: str, tokens: IndexedDataset) -> Optional[IndexedDataset]:
        if dataset_path is None or not token_flags.has_flags(dataset_path):
            return None
        flags = IndexedDataset(token_flags.flags_prefix(dataset_path))
        if not np.array_equal(flags.sequence_lengths, tokens.sequence_lengths):
            raise ValueError(f"{token_flags.flags_prefix(dataset_path)} does not match the "
                             f"documents of {dataset_path} (written by another preprocessing "
                             "run?); re-run tools/preprocess_data.py")
        return flags

    def sample_flags(self, idx: Optional[int]) -> Optional[np.ndarray]:
        """The flags of the window ``__getitem__(idx)`` reads (``seq_length + 1`` values)."""
        if self.flags is None:
            return None
        if self.shuffle_index is None:
            self._query_document_sample_shuffle_indices(0)  # GPTDataset loads its indices lazily
        # GPTDataset's own window lookup, pointed at the flags file (padding reads as 0: no flag).
        view = types.SimpleNamespace(
            shuffle_index=self.shuffle_index, sample_index=self.sample_index,
            document_index=self.document_index, dataset=self.flags, config=self.config,
            _pad_token_id=0)
        flags, _ = GPTDataset._query_document_sample_shuffle_indices(view, 0 if idx is None else idx)
        return flags.astype(np.uint8)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        tokens = sample["tokens"]
        length = len(tokens)
        flags = self.sample_flags(idx) if self._needs_flags else None
        if flags is not None and len(flags) != length + 1:
            raise ValueError(f"flags window of {len(flags)} for a sample of {length} tokens; the "
                             "loader needs add_extra_token_to_sequence")
        target = self.config.target_seq_length or length
        segment_ends = None if flags is None else (flags[:-1] & token_flags.SEGMENT_END) != 0
        rng = position_schemes.sample_rng(self.config.random_seed, self._stream,
                                          -1 if idx is None else int(idx))
        if self.config.packed_documents:
            self._pack(sample, flags)
            if self.config.position_scheme != "contiguous":
                sample["position_ids"] = self._per_document_positions(
                    sample["document_ids"].numpy(), segment_ends, target, rng, idx)
        elif self.config.position_scheme != "contiguous":
            ids = self._scheme_ids(length, segment_ends, target, rng, idx)
            sample["position_ids"] = torch.from_numpy(ids)
        # contiguous: GPTDataset's own 0..n-1
        if self.config.sft:
            is_target = (flags[1:] & token_flags.TARGET) != 0
            sample["loss_mask"] = sample["loss_mask"] * torch.from_numpy(is_target).float()
        return sample

    def _scheme_ids(self, length: int, segment_ends: Optional[np.ndarray], target: int,
                    rng: np.random.Generator, idx) -> np.ndarray:
        ids = position_schemes.position_ids(
            self.config.position_scheme, target, rng, length, segment_ends,
            self.config.pose_num_chunks, self.config.longrecipe_contiguous_prefix)
        if ids[-1] >= target:  # ids increase: the last is the largest
            raise UserError(f"sample {idx}: position id {int(ids[-1])} is beyond "
                             f"--target-seq-length {target}")
        return ids

    def _per_document_positions(self, document_ids: np.ndarray,
                                segment_ends: Optional[np.ndarray], target: int,
                                rng: np.random.Generator, idx) -> torch.Tensor:
        """The scheme's ids drawn for every document piece on its own, in window order."""
        starts = np.flatnonzero(np.diff(document_ids, prepend=-1))
        bounds = np.append(starts, len(document_ids))
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            ends = None if segment_ends is None else segment_ends[start:end]
            pieces.append(self._scheme_ids(int(end - start), ends, target, rng, idx))
        return torch.from_numpy(np.concatenate(pieces))

    def _pack(self, sample: Dict[str, torch.Tensor], flags: Optional[np.ndarray]) -> None:
        if flags is not None:
            ends = torch.from_numpy((flags[:-1] & token_flags.DOCUMENT_END) != 0)
        else:
            ends = sample["tokens"] == self.config.tokenizer.eod
        ends = ends.long()
        document_ids = torch.cumsum(ends, 0) - ends
        positions = torch.arange(len(ends))
        starts = torch.zeros_like(positions)
        first = torch.ones_like(ends, dtype=torch.bool)
        first[1:] = document_ids[1:] != document_ids[:-1]
        starts[first] = positions[first]
        sample["document_ids"] = document_ids
        sample["position_ids"] = positions - torch.cummax(starts, 0).values
        # The last token of a document must not learn to predict the next document.
        sample["loss_mask"] = sample["loss_mask"] * (1 - ends).float()
