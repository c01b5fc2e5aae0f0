"""Next-token prediction: pretraining and SFT (which differ only in which targets count).

The dataset decides which targets count (``loss_mask``: every token for pretraining, assistant
answers for SFT), which positions each token has and, for packed documents, the document ids.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List

import torch
from megatron.core import parallel_state

from megatron_ext.config import ObjectiveConfig, RunConfig
from megatron_ext.parallel.cp_layout import slice_for_cp
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.errors import ArgumentError
from megatron_ext.losses import masked_token_loss
from megatron_ext.model.cp_attention import DocumentMaskParams


@dataclasses.dataclass(frozen=True)
class LanguageModeling:
    name: str  # "pretrain" or "sft"

    def validate(self, args) -> None:
        if args.position_scheme == "logo":
            raise ArgumentError("--position-scheme logo synthesises positions for preference data "
                                "(tools/preprocess_preference.py); use pose or longrecipe for text")
        # SFT packs whole conversations and keeps them apart with document masks.
        args.packed_documents = (args.packed_documents or args.reset_attention_mask
                                 or self.name == "sft")
        if args.document_packing is None:
            args.document_packing = "whole" if self.name == "sft" else "stream"
        if args.document_packing == "whole" and not args.packed_documents:
            raise ArgumentError("--document-packing whole keeps documents apart in a window: "
                                "add --packed-documents")

    def config(self, args) -> ObjectiveConfig:
        return ObjectiveConfig(self.name)  # its flags are the data section's

    def datasets(self, cfg: RunConfig, tokenizer, num_samples: List[int]) -> list:
        data = cfg.data
        return build_gpt_datasets(
            data.data_blend, data.split, cfg.model.seq_length, cfg.training.seed, tokenizer,
            num_samples=num_samples,
            cache_dir=data.data_cache_path,
            eod_mask_loss=data.eod_mask_loss,
            packed_documents=data.packed_documents,
            sft=self.name == "sft",
            position_scheme=data.position_scheme,
            target_seq_length=data.target_seq_length,
            pose_num_chunks=data.pose_num_chunks,
            longrecipe_contiguous_prefix=data.longrecipe_contiguous_prefix,
            document_packing=data.document_packing,
            overlong_documents=data.overlong_documents,
        )

    def build(self, cfg: RunConfig, device):
        return LanguageModelingStep(device)


@dataclasses.dataclass
class LanguageModelingStep:
    """Next-token prediction over ``loss_mask``; the strategy the schedule calls per micro-batch.

    Every rank reads the whole micro-batch; with context parallelism it keeps its own slice of the
    sequence (tokens, labels, loss mask, position ids and document ids alike).
    """

    device: torch.device
    loss_key: str = "lm loss"
    metrics: tuple = ()

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        seq_length = batch["tokens"].shape[1]
        batch = slice_for_cp(batch, parallel_state.get_context_parallel_world_size(),
                             parallel_state.get_context_parallel_rank())
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        documents = (DocumentMaskParams.for_tokens(batch["document_ids"], seq_length)
                     if "document_ids" in batch else None)
        per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                               packed_seq_params=documents)
        return per_token_loss, functools.partial(masked_token_loss, batch["loss_mask"])
