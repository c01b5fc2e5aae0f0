"""The preference-alignment strategy the training schedule calls per micro-batch.

A micro-batch holds rows built by ``data/preference_samples.py`` (all answers of a row in one
sequence, separate or shared-prefix). Per micro-batch:

1. every rank reads the whole micro-batch, counts the scored tokens of each answer (the
   length normalisation needs whole answers) and keeps its context-parallel slice;
2. the model runs with document / branch masks, and on the last pipeline stage only the scored
   positions reach the output layer (``model/output_rows.py``), so logits exist for answer
   tokens only (never [sequence x vocabulary]);
3. the label log-probs come from Megatron's vocab-parallel cross entropy; per-answer sums are
   added over CP; ``preference_loss`` turns them into per-row losses.

Megatron's per-token-loss mode normalises by the count we return: rows here (reported by CP rank
0 only, since every CP rank holds the same per-row losses), so the objective is the mean loss over
the rows of the global batch, for any layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_ext.parallel.cp_layout import slice_for_cp
from megatron_ext.model.cp_attention import DocumentMaskParams
from megatron_ext.model.output_rows import OutputRows
from megatron_ext.objectives.preference_loss import (METRICS, PreferenceLossConfig, answer_log_prob_sums,
                                          preference_losses)

LOSS_KEY = "preference loss"


@dataclasses.dataclass
class PreferenceObjective:
    device: torch.device
    loss_config: PreferenceLossConfig
    # dpo / ipo: the reference's (sums, means) [rows, 1 + M] from --reference-logps.
    reference: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    loss_key: str = LOSS_KEY
    metrics: tuple = METRICS

    def __post_init__(self):
        self.num_branches = self.loss_config.num_rejected + 1
        self.output_rows = OutputRows()

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        batch_size, seq_length = batch["tokens"].shape
        # Whole answers: each rank divides its partial sums by the answer's full length.
        branches = torch.arange(self.num_branches).view(1, -1, 1)
        counts = (batch["score_branch"].unsqueeze(1) == branches).sum(dim=2)
        if bool((counts == 0).any()):
            raise ValueError("a preference row has an answer without scored tokens")
        cp, cp_rank = (parallel_state.get_context_parallel_world_size(),
                       parallel_state.get_context_parallel_rank())
        local = slice_for_cp({k: batch[k] for k in ("tokens", "labels", "position_ids",
                                                    "document_ids", "branch_ids", "score_branch")},
                             cp, cp_rank)
        local = {k: v.to(self.device, non_blocking=True) for k, v in local.items()}
        # Scored positions, in the decoder's sequence-major flattening (index = t * b + row).
        score_branch = local["score_branch"].t().reshape(-1)
        rows = torch.nonzero(score_branch >= 0).view(-1)
        scored = {"rows": rows % batch_size, "branches": score_branch[rows],
                  "labels": local["labels"].t().reshape(-1)[rows],
                  "counts": counts.to(self.device), "row_ids": batch["row"]}
        masks = DocumentMaskParams.for_tokens(local["document_ids"], seq_length,
                                              branch_ids=local["branch_ids"])
        with self.output_rows.only(model, rows):
            output = model(local["tokens"], local["position_ids"], None, packed_seq_params=masks)
        return output, functools.partial(self.loss, scored, batch_size)

    def loss(self, scored: Dict[str, torch.Tensor], batch_size: int, logits: torch.Tensor):
        """logits [1, n, V / TP] of this rank's scored positions -> (loss sum, rows, reports)."""
        token_losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float(), scored["labels"].view(1, -1))[0]
        sums = answer_log_prob_sums(-token_losses, scored["rows"], scored["branches"], batch_size,
                                    self.num_branches,
                                    parallel_state.get_context_parallel_group())
        reference = None
        if self.reference is not None:
            reference = tuple(t[scored["row_ids"]].to(sums) for t in self.reference)
        per_row = preference_losses(sums / scored["counts"], self.loss_config, sums, reference)
        # Every CP rank back-propagates the same loss through its own tokens; CP rank 0 alone
        # counts the rows and reports them, so nothing is counted twice.
        owner = parallel_state.get_context_parallel_rank() == 0
        rows = torch.tensor(batch_size if owner else 0, dtype=torch.int, device=logits.device)
        reports = {key: torch.stack([per_row[name].detach().sum(), rows.float()]) * float(owner)
                   for key, name in ((self.loss_key, "loss"), *((m, m) for m in self.metrics))}
        return per_row["loss"].sum(), rows, reports
