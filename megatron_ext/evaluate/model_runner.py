"""Forward passes of a Megatron model for evaluation, under any TP / PP / CP / DP layout.

Two questions are asked, each about a list of equally long token sequences that every rank holds
in full (the tasks build them deterministically, so no rank has to send them):

  token_losses(sequences)             the next-token loss at every position (ppl-by-position)
  greedy_answers(sequences, starts)   for the answer tokens at the end of each sequence: the
                                      argmax token and the loss of the gold token, each given all
                                      gold tokens before it (needle tasks)

How the layout is handled:
* DP: sequence ``i`` runs on data-parallel rank ``i % DP``; results are gathered afterwards.
* PP: sequences are micro-batches of Megatron-Core's forward-only schedule (the one training
  uses), so stages overlap; results live on the last stage and are broadcast to the others.
* CP: each rank keeps its slice of the sequence (``slice_for_cp``, as in training); per-token
  losses are all-gathered and put back in order; answer predictions are made by whichever rank
  holds the position and combined with one max-reduction.
* TP: the output layer stays vocab-parallel. The loss is Megatron's vocab-parallel cross
  entropy; the argmax is each rank's local (max, index) followed by a gather of two numbers per
  position, never the full vocabulary.

For answers, only the answer positions reach the output layer (``model/output_rows.py``): at 64K
tokens, logits for every position would be tens of GB for a 150K vocabulary.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.checkpoints import checkpointing
from megatron_ext.config import ModelConfig
from megatron_ext.parallel.layout import Layout
from megatron_ext.parallel.cp_layout import cp_token_indices, merge_cp_slices, slice_for_cp
from megatron_ext.model.output_rows import OutputRows, unwrap

Progress = Optional[Callable[[int], None]]


def load_model(load: str, model_config: ModelConfig, layout: Layout, device: torch.device,
               on_cpu: bool) -> Tuple[ModelConfig, torch.nn.Module]:
    """This rank's stage of the checkpoint under ``load``, weights only, in eval mode, and the
    model config with the checkpoint's embedding rows.

    The embedding size comes from the checkpoint (``model_args.json``), not the tokenizer:
    converted Qwen2 / SmolLM2 embeddings can be longer than their tokenizers.
    """
    from megatron_ext.model import build_model, transformer_config

    ckpt_dir, _ = checkpointing.checkpoint_dir_to_load(load)
    saved = checkpointing.read_model_args(ckpt_dir)
    model_config = model_config.with_vocab(saved["padded_vocab_size"])
    config = transformer_config(model_config, layout, on_cpu)
    config.perform_initialization = False  # every weight comes from the checkpoint
    model = build_model(model_config, layout, config, on_cpu).to(device)
    checkpointing.load(load, [model], None, None, model_config, checkpointing.WEIGHTS_ONLY)
    return model_config, model.eval()


def vocab_parallel_argmax(logits: torch.Tensor, vocab_limit: int) -> torch.Tensor:
    """Argmax over the full vocabulary of vocab-parallel ``logits`` [..., V / TP], ids below
    ``vocab_limit`` only; ties go to the lowest id, as ``torch.argmax`` on gathered logits."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    first_id = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    local = logits.float()
    if vocab_limit < first_id + logits.shape[-1]:
        # Padding rows (converted checkpoints) and ids the tokenizer cannot decode never win.
        local = local.clone()
        local[..., max(0, vocab_limit - first_id):] = float("-inf")
    best, index = local.max(dim=-1)
    index = index + first_id
    if tp == 1:
        return index
    bests = [torch.empty_like(best) for _ in range(tp)]
    indices = [torch.empty_like(index) for _ in range(tp)]
    torch.distributed.all_gather(bests, best.contiguous(), group=group)
    torch.distributed.all_gather(indices, index.contiguous(), group=group)
    winner = torch.stack(bests).argmax(dim=0, keepdim=True)  # first max: the lowest ids
    return torch.stack(indices).gather(0, winner).squeeze(0)


class ModelRunner:
    """Evaluation forward passes of one (unwrapped) model stage on this rank."""

    def __init__(self, model: torch.nn.Module, device: torch.device, vocab_limit: int):
        self.model = unwrap(model)
        self.device = device
        self.vocab_limit = int(vocab_limit)
        self._output_rows = OutputRows()

    # -- layout ----------------------------------------------------------------------------

    @staticmethod
    def _cp() -> Tuple[int, int]:
        return (parallel_state.get_context_parallel_world_size(),
                parallel_state.get_context_parallel_rank())

    @staticmethod
    def _dp() -> Tuple[int, int]:
        return parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()

    # -- the schedule ----------------------------------------------------------------------

    def _forward_step(self, data_iterator: Iterator[dict], model):
        item = next(data_iterator)
        tokens = torch.as_tensor(item["tokens"], dtype=torch.long).view(1, -1)
        length = tokens.shape[1]
        batch = {"tokens": tokens, "position_ids": torch.arange(length).view(1, -1)}
        answer_start = item.get("answer_start")
        if answer_start is None:
            labels = torch.zeros_like(tokens)  # the last position's label is never read
            labels[:, :-1] = tokens[:, 1:]
            batch["labels"] = labels
        cp, cp_rank = self._cp()
        batch = {k: v.to(self.device) for k, v in slice_for_cp(batch, cp, cp_rank).items()}
        if answer_start is None:
            return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), None
        # Positions answer_start - 1 .. length - 2 predict the answer tokens.
        held = cp_token_indices(length, cp, cp_rank)
        keep = torch.nonzero((held >= answer_start - 1) & (held <= length - 2)).view(-1)
        with self._output_rows.only(model, keep.to(self.device)):
            return model(batch["tokens"], batch["position_ids"], None), None

    def _schedule(self, items: List[dict], length: int) -> List[torch.Tensor]:
        """Model outputs of ``items`` (on the last pipeline stage; empty elsewhere)."""
        if not items:
            return []
        with torch.no_grad():
            return get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=iter(items),
                model=[self.model], num_microbatches=len(items), seq_length=length,
                micro_batch_size=1, forward_only=True)

    def _run(self, items: List[dict], finish: Callable[[List[torch.Tensor], List[dict]], list],
             progress: Progress) -> list:
        """Shards ``items`` over DP, runs them in chunks, returns ``finish``'s per-item results
        for all items, in order, on every rank."""
        if not items:
            return []
        length = len(items[0]["tokens"])
        if any(len(item["tokens"]) != length for item in items):
            raise ValueError("one call evaluates sequences of one length")
        dp, dp_rank = self._dp()
        mine = items[dp_rank::dp]
        # A few micro-batches per pipeline stage keep the stages busy; progress per chunk.
        chunk = 2 * parallel_state.get_pipeline_model_parallel_world_size()
        results, reported = [], 0
        for start in range(0, len(mine), chunk):
            part = mine[start:start + chunk]
            outputs = self._schedule(part, length)
            results.extend(finish(outputs, part) if parallel_state.is_pipeline_last_stage()
                           else [None] * len(part))
            if progress is not None:  # rank 0 reports for all DP ranks (they move in step)
                step = min(len(part) * dp, len(items) - reported)
                reported += step
                progress(step)
        results = _from_last_stage(results)
        return _gather_over_dp(results, len(items))

    # -- the two questions -----------------------------------------------------------------

    def token_losses(self, sequences: Sequence[np.ndarray], progress: Progress = None
                     ) -> List[np.ndarray]:
        """float32 [L - 1] per sequence: loss of token t + 1 given tokens 0..t."""
        cp, _ = self._cp()
        group = parallel_state.get_context_parallel_group()

        def finish(outputs, part):
            out = []
            for loss in outputs:
                loss = loss.float().contiguous()
                if cp > 1:
                    parts = [torch.empty_like(loss) for _ in range(cp)]
                    torch.distributed.all_gather(parts, loss, group=group)
                    loss = merge_cp_slices(parts, seq_dim=1)
                out.append(loss[0, :-1].cpu().numpy())
            return out

        return self._run([{"tokens": s} for s in sequences], finish, progress)

    def greedy_answers(self, sequences: Sequence[np.ndarray], answer_starts: Sequence[int],
                       progress: Progress = None) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(argmax tokens int64 [n], gold-token losses float32 [n]) per sequence, for the n
        answer tokens ``sequence[answer_start:]``, each given the gold tokens before it.

        Greedy decoding emits the gold answer exactly when every argmax equals its gold token,
        and up to the first mismatch it emits exactly these argmax tokens.
        """
        cp, cp_rank = self._cp()
        group = parallel_state.get_context_parallel_group()

        def finish(outputs, part):
            out = []
            for logits, item in zip(outputs, part, strict=True):
                length, start = len(item["tokens"]), item["answer_start"]
                held = cp_token_indices(length, cp, cp_rank)
                rows = held[(held >= start - 1) & (held <= length - 2)] - (start - 1)
                logits = logits.transpose(0, 1).contiguous()  # [k, 1, V / TP]
                predicted = vocab_parallel_argmax(logits, self.vocab_limit)[:, 0]
                gold = torch.as_tensor(item["tokens"][start:], dtype=torch.long)
                gold_here = gold[rows].view(-1, 1).to(logits.device)
                loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), gold_here)[:, 0]
                full_pred = torch.full((len(gold),), -1, dtype=torch.long, device=logits.device)
                full_loss = torch.full((len(gold),), float("-inf"), device=logits.device)
                full_pred[rows.to(logits.device)] = predicted
                full_loss[rows.to(logits.device)] = loss
                if cp > 1:  # every answer position is held by exactly one CP rank
                    torch.distributed.all_reduce(full_pred, torch.distributed.ReduceOp.MAX, group=group)
                    torch.distributed.all_reduce(full_loss, torch.distributed.ReduceOp.MAX, group=group)
                out.append((full_pred.cpu().numpy(), full_loss.cpu().numpy()))
            return out

        items = []
        for sequence, start in zip(sequences, answer_starts, strict=True):
            if not 1 <= start < len(sequence):
                raise ValueError(f"answer start {start} outside a sequence of {len(sequence)}")
            items.append({"tokens": sequence, "answer_start": int(start)})
        return self._run(items, finish, progress)


def _from_last_stage(results: list) -> list:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return results
    holder = [results]
    torch.distributed.broadcast_object_list(
        holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group())
    return holder[0]


def _gather_over_dp(results: list, total: int) -> list:
    """Every DP rank's results (item i came from rank i % DP) back in item order."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1:
        return results
    everyone: List[list] = [None] * dp
    torch.distributed.all_gather_object(everyone, results,
                                        group=parallel_state.get_data_parallel_group())
    return [everyone[i % dp][i // dp] for i in range(total)]
