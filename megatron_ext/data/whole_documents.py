"""Windows of whole documents: SFT conversations (and, on request, any packed data) never cut.

Megatron's GPTDataset concatenates documents into one token stream and cuts ``--seq-length``
windows from it, so a conversation that crosses a window edge has its second half trained without
its prompt. Here every window holds whole documents instead, as ProLong packs SFT data:

* documents are placed first-fit, in an order shuffled by (seed, epoch), into windows of
  ``--seq-length`` tokens (at most ``OPEN_WINDOWS`` windows stay open, so building is linear in
  the number of documents); the rest of a window is padding, which is never a target and is its
  own document for attention;
* a document longer than the window is cut to its first ``--seq-length`` tokens (counted) or,
  with ``--overlong-documents error``, refused;
* each document's targets stay inside it (its last token predicts nothing unless the document
  was cut), and its positions restart at 0 (or follow the position scheme, per document).

The packing is a pure function of (documents, split, seq length, seed, epochs): it is recomputed
identically on every rank and saved with a summary (windows, documents, cut documents, packing
efficiency = document tokens / window tokens) under the dataset cache when one is set.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_ext.data import token_flags
from megatron_ext.data.samples import AnnotatedGPTDataset
from megatron_ext.errors import UserError

OPEN_WINDOWS = 64  # windows still accepting documents; the fullest is closed beyond this


def first_fit(lengths: np.ndarray, capacity: int, open_limit: int = OPEN_WINDOWS
              ) -> List[List[int]]:
    """Positions into ``lengths`` grouped into windows of at most ``capacity`` tokens, first fit
    in the given order (each length must be <= capacity)."""
    closed: List[List[int]] = []
    open_items: List[List[int]] = []
    room: List[int] = []
    for position, length in enumerate(lengths.tolist()):
        for w, free in enumerate(room):
            if free >= length:
                open_items[w].append(position)
                room[w] -= length
                break
        else:
            open_items.append([position])
            room.append(capacity - length)
            if len(open_items) > open_limit:  # close the fullest: it takes the fewest documents
                fullest = int(np.argmin(room))
                closed.append(open_items.pop(fullest))
                room.pop(fullest)
    # Windows in the order they were opened keep the shuffled order's randomness.
    return closed + open_items


class WholeDocumentDataset(AnnotatedGPTDataset):
    """``AnnotatedGPTDataset`` whose windows hold whole documents (see the module docstring)."""

    def _build_document_sample_shuffle_indices(self):
        capacity = self.config.sequence_length
        lengths = self.dataset.sequence_lengths[self.indices].astype(np.int64)
        overlong = int((lengths > capacity).sum())
        if overlong and self.config.overlong_documents == "error":
            longest = int(lengths.max())
            raise UserError(
                f"{overlong} documents of {self.dataset_path} are longer than --seq-length "
                f"{capacity} (the longest has {longest} tokens); raise --seq-length, or "
                "--overlong-documents truncate keeps their first --seq-length tokens")
        kept = np.minimum(lengths, capacity)
        cached = self._load_packing()
        if cached is not None:
            return cached
        documents, offsets, epoch = [], [0], 0
        while len(offsets) - 1 < max(1, self.num_samples or 0):
            order = np.random.default_rng([self.config.random_seed, epoch]).permutation(
                len(self.indices))
            for window in first_fit(kept[order], capacity):
                documents.extend(order[window].tolist())
                offsets.append(len(documents))
            epoch += 1
        document_index = np.asarray(documents, dtype=np.int64)  # positions into self.indices
        sample_index = np.asarray(offsets, dtype=np.int64)
        shuffle_index = np.arange(len(offsets) - 1, dtype=np.int64)
        self.packing_summary = self._summary(kept, lengths, document_index, sample_index, epoch)
        self._save_packing(document_index, sample_index)
        return document_index, sample_index, shuffle_index

    # -- the packing on disk -------------------------------------------------------------------

    def _packing_path(self) -> Optional[str]:
        if not self.config.path_to_cache:
            return None
        key = json.dumps([self.unique_description, int(self.num_samples or 0),
                          hashlib.md5(self.indices.tobytes()).hexdigest(),
                          self.config.overlong_documents])
        digest = hashlib.md5(key.encode()).hexdigest()
        return os.path.join(self.config.path_to_cache, f"whole-documents-{digest}.npz")

    def _load_packing(self):
        path = self._packing_path()
        if path is None or not os.path.exists(path):
            return None
        with np.load(path) as saved:
            document_index, sample_index = saved["document_index"], saved["sample_index"]
        with open(path[:-4] + ".json") as f:
            self.packing_summary = json.load(f)
        return document_index, sample_index, np.arange(len(sample_index) - 1, dtype=np.int64)

    def _save_packing(self, document_index: np.ndarray, sample_index: np.ndarray) -> None:
        path = self._packing_path()
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, document_index=document_index, sample_index=sample_index)
        os.replace(tmp, path)
        with open(path[:-4] + ".json.tmp", "w") as f:
            json.dump(self.packing_summary, f, indent=2)
        os.replace(path[:-4] + ".json.tmp", path[:-4] + ".json")

    def _summary(self, kept: np.ndarray, lengths: np.ndarray, document_index: np.ndarray,
                 sample_index: np.ndarray, epochs: int) -> Dict:
        windows = len(sample_index) - 1
        used = int(kept[document_index].sum())
        return {"dataset": self.dataset_path, "split": self.index_split.name,
                "windows": windows, "documents": int(len(kept)), "epochs": epochs,
                "truncated_documents": int((lengths > self.config.sequence_length).sum()),
                "packing_efficiency": round(used / max(1, windows * self.config.sequence_length),
                                            4)}

    # -- samples --------------------------------------------------------------------------------

    def _window_documents(self, idx: int) -> List[int]:
        window = int(self.shuffle_index[idx])
        begin, end = self.sample_index[window], self.sample_index[window + 1]
        return [int(self.indices[d]) for d in self.document_index[begin:end]]

    def _document(self, document: int) -> Tuple[np.ndarray, Optional[np.ndarray], int]:
        """(tokens incl. the next target, flags of the same tokens, tokens kept) of a document."""
        capacity = self.config.sequence_length
        length = int(self.dataset.sequence_lengths[document])
        kept = min(length, capacity)
        read = min(length, capacity + 1)  # a cut document's next token is still its target
        tokens = self.dataset.get(document, offset=0, length=read)
        flags = None if self.flags is None else self.flags.get(document, offset=0, length=read)
        return tokens, flags, kept

    def sample_flags(self, idx: Optional[int]) -> Optional[np.ndarray]:
        """The flags of the window's tokens (``seq_length + 1`` values; padding has none)."""
        if self.flags is None:
            return None
        out = np.zeros(self.config.sequence_length + 1, dtype=np.uint8)
        start = 0
        for document in self._window_documents(0 if idx is None else idx):
            _, flags, kept = self._document(document)
            out[start:start + kept] = flags[:kept]
            out[start + kept - 1] |= token_flags.DOCUMENT_END  # documents end in the window
            start += kept
        return out

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        capacity = self.config.sequence_length
        # Padding reads token 0 (as Megatron pads) and is masked by position, never by value:
        # tokenizers whose pad id is their EOD id would otherwise lose every EOD target.
        tokens = np.zeros(capacity, dtype=np.int64)
        labels = np.zeros(capacity, dtype=np.int64)
        loss_mask = np.zeros(capacity, dtype=np.float32)
        document_ids = np.zeros(capacity, dtype=np.int64)
        segment_ends = np.zeros(capacity, dtype=bool)
        start = 0
        documents = self._window_documents(0 if idx is None else idx)
        for number, document in enumerate(documents):
            text, flags, kept = self._document(document)
            window = slice(start, start + kept)
            tokens[window] = text[:kept]
            targets = text[1:kept + 1]
            labels[start:start + len(targets)] = targets
            targets_here = np.zeros(kept, dtype=np.float32)
            targets_here[:len(targets)] = 1.0
            if self.config.sft:
                targets_here[:len(targets)] *= (flags[1:kept + 1] & token_flags.TARGET) != 0
            elif self.config.eod_mask_loss:
                targets_here[:len(targets)] *= targets != self.config.tokenizer.eod
            loss_mask[window] = targets_here
            document_ids[window] = number
            if flags is not None:
                segment_ends[window] = (flags[:kept] & token_flags.SEGMENT_END) != 0
            start += kept
        document_ids[start:] = len(documents)  # padding: its own document, never a target
        if idx is None:
            loss_mask[:] = 0.0
        sample = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                  "loss_mask": torch.from_numpy(loss_mask),
                  "document_ids": torch.from_numpy(document_ids)}
        positions = np.arange(capacity) - np.maximum.accumulate(
            np.where(np.diff(document_ids, prepend=-1) != 0, np.arange(capacity), 0))
        if self.config.position_scheme != "contiguous":
            from megatron_ext.data import position_schemes

            rng = position_schemes.sample_rng(self.config.random_seed, self._stream,
                                              -1 if idx is None else int(idx))
            target = self.config.target_seq_length or capacity
            positions = self._per_document_positions(
                document_ids, segment_ends if self.flags is not None else None, target, rng,
                idx).numpy()
        sample["position_ids"] = torch.from_numpy(positions.astype(np.int64))
        return sample
