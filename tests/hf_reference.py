"""transformers as the independent reference: the batches megatron_ext.train reads at iteration 1,
and transformers' token-averaged loss (and gradients) on them."""

from __future__ import annotations

from typing import List

import torch


def first_batches(tokenizer_dir: str, data_prefix: str, cache: str, seq: int, seed: int,
                  global_batch: int) -> List[dict]:
    """The micro-batches (size 1) of the first global batch, as a single process reads them."""
    from megatron_ext.arguments import parse_data_path
    from megatron_ext.data.gpt_data import BatchLayout, MicroBatchIterator, build_gpt_datasets
    from megatron_ext.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    train, _, _ = build_gpt_datasets(parse_data_path([data_prefix]), "100,0,0", seq, seed,
                                     tokenizer, [5 * global_batch, 0, 0], cache)
    batches = MicroBatchIterator(train, BatchLayout(1, 1, 0, global_batch), start_iteration=0)
    return [next(batches) for _ in range(global_batch)]


def token_averaged_loss(model, batches: List[dict]) -> torch.Tensor:
    """Sum of the masked token losses over all batches / number of scored tokens (the loss
    megatron_ext computes with calculate_per_token_loss), differentiable."""
    total, count = 0.0, 0.0
    for batch in batches:
        logits = model(batch["tokens"]).logits
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(),
                                                   batch["labels"].flatten(), reduction="none")
        mask = batch["loss_mask"].flatten().double()
        total = total + (losses * mask).sum()
        count += mask.sum().item()
    return total / count
