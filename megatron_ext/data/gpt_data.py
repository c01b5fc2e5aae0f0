"""Samples for language-model pretraining: Megatron-Core's GPTDataset / BlendedDataset over
IndexedDataset files, read in a fixed global order so every layout sees the same global batch.

The global batch of iteration i is samples [i*G, (i+1)*G) of the train split. Inside it, data-
parallel rank r takes micro-batch m as the slice [m*M*D + r*M, m*M*D + (r+1)*M) (M = micro batch,
D = data-parallel size) - Megatron-LM's sampler order. The loader's whole state is therefore the
number of consumed samples, which is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from megatron_ext import parallel
from megatron_ext.data.samples import AnnotatedGPTDataset, SampleConfig
from megatron_ext.data.whole_documents import WholeDocumentDataset
from megatron_ext.errors import UserError


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    data_parallel_size: int
    data_parallel_rank: int
    num_microbatches: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.data_parallel_size * self.num_microbatches

    def sample_indices(self, iteration: int, microbatch: int) -> range:
        start = (iteration * self.global_batch_size
                 + microbatch * self.micro_batch_size * self.data_parallel_size
                 + self.data_parallel_rank * self.micro_batch_size)
        return range(start, start + self.micro_batch_size)


SPLIT_NAMES = ("train", "valid", "test")


def documents_per_split(num_documents: int, split: str) -> List[int]:
    """How many documents Megatron's builder gives each split (its rounding rule)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    counts = []
    for bookends in convert_split_vector_to_split_matrix(parse_and_normalize_split(split)):
        if bookends is None:
            counts.append(0)
        else:
            counts.append(int(round(bookends[1] * num_documents)) - int(round(bookends[0] * num_documents)))
    return counts


def check_splits(prefixes: List[str], split: str, needed: List[bool]) -> None:
    """Refuse a split that leaves a needed part of any dataset without documents.

    (Megatron-Core's GPTDataset loops forever on an empty split, and long-document corpora have
    few documents, so this is easy to hit.)
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        total = len(IndexedDataset(prefix))
        counts = documents_per_split(total, split)
        for name, count, need in zip(SPLIT_NAMES, counts, needed):
            if need and count == 0:
                raise UserError(
                    f"--split {split} gives the {name} split of {prefix} no documents (it has "
                    f"{total}); raise the {name} share of --split or add documents")


def build_gpt_datasets(
    blend,
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: List[int],
    cache_dir: Optional[str],
    eod_mask_loss: bool = False,
    **sample_options,
):
    """[train, valid, test] datasets sized to ``num_samples`` (0: a split nobody reads).

    ``sample_options`` are ``SampleConfig`` fields: position scheme, target length, packed
    documents, sft.
    """
    needed = [n > 0 for n in num_samples]
    check_splits(blend[0], split, needed)
    config = SampleConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        # Packed documents (positions, masks, document ids) are built by AnnotatedGPTDataset.
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        **sample_options,
    )
    # A split nobody reads is not built at all (Megatron loops forever on an empty split asked for
    # 0 samples); the other splits keep their document ranges.
    config.split_matrix = [bookends if need else None
                           for bookends, need in zip(config.split_matrix, needed)]
    # Megatron's blend builder asks for the rank even in one process (inspect_batches, tests).
    parallel.ensure_torch_distributed()
    # Every rank builds (cheap, cached on disk by rank 0 first) so each can read any sample.
    dataset_class = (WholeDocumentDataset if config.document_packing == "whole"
                     else AnnotatedGPTDataset)
    datasets = BlendedMegatronDatasetBuilder(dataset_class, num_samples, lambda: True,
                                             config).build()
    if dataset_class is WholeDocumentDataset and parallel.is_rank0():
        for summary in packing_summaries(datasets):
            print(f" whole-document packing of {summary['dataset']} ({summary['split']}): "
                  f"{summary['documents']} documents in {summary['windows']} windows, "
                  f"{summary['truncated_documents']} cut to --seq-length, packing efficiency "
                  f"{summary['packing_efficiency']:.1%}", flush=True)
    return datasets


def packing_summaries(datasets) -> List[dict]:
    """The whole-document packing summaries of these datasets (blends searched too)."""
    found = []
    for dataset in datasets:
        parts = getattr(dataset, "datasets", [dataset]) if dataset is not None else []
        found += [part.packing_summary for part in parts if hasattr(part, "packing_summary")]
    return found


def build_preference_datasets(blend, tokenizer, num_samples: List[int], *, split: str,
                              seq_length: int, num_rejected: int, packing: str,
                              position_scheme: str, target_seq_length: int, seed: int):
    """[train, valid, test] preference datasets of ``blend`` (prefixes, weights or None; None
    for a split nobody reads); ``num_rejected`` was filled from the data while the flags were
    read. Several datasets are mixed by weight, sample by sample (``BlendedPreferenceDataset``)."""
    from megatron_ext.data.preference_samples import (BlendedPreferenceDataset, PreferenceConfig,
                                                      PreferenceDataset, PreferenceRows,
                                                      blend_assignment, split_rows)

    prefixes, weights = blend
    config = PreferenceConfig(
        seq_length=seq_length, num_rejected=num_rejected, layout=packing,
        position_scheme=position_scheme, target_seq_length=target_seq_length, seed=seed,
        pad_token=tokenizer.pad if tokenizer.pad is not None and tokenizer.pad >= 0 else tokenizer.eod)
    all_rows = [PreferenceRows(prefix) for prefix in prefixes]
    datasets = []
    for split_index, (name, count) in enumerate(zip(SPLIT_NAMES, num_samples)):
        if count <= 0:
            datasets.append(None)
            continue
        sources, counts = blend_assignment(weights or [1.0], count)
        parts = []
        for rows, needed in zip(all_rows, counts):
            part = split_rows(len(rows), split)[split_index]
            if len(part) == 0:
                raise UserError(f"--split {split} gives the {name} split of {rows.prefix} no "
                                f"rows (it has {len(rows)}); raise the {name} share of --split")
            parts.append(PreferenceDataset(rows, part, max(1, needed), config, name))
        datasets.append(parts[0] if len(parts) == 1
                        else BlendedPreferenceDataset(parts, sources, count))
    return datasets


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


class MicroBatchIterator:
    """Yields this rank's micro-batches from ``start_iteration`` on, in the global order above."""

    def __init__(self, dataset, layout: BatchLayout, start_iteration: int = 0):
        self.dataset = dataset
        self.layout = layout
        self.iteration = start_iteration
        self._microbatch = 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        indices = self.layout.sample_indices(self.iteration, self._microbatch)
        if indices.stop > len(self.dataset):
            raise StopIteration
        batch = collate([self.dataset[i] for i in indices])
        self._microbatch += 1
        if self._microbatch == self.layout.num_microbatches:
            self._microbatch = 0
            self.iteration += 1
        return batch

    @property
    def consumed_samples(self) -> int:
        return self.iteration * self.layout.global_batch_size

