"""Offline reference log-probs for DPO / IPO: a reference model's answer log-probs, computed once.

DPO compares the policy with a frozen reference model. At 64K tokens a second model in memory
doubles what a rank holds, so the usual answer is to run the reference once, before training:

    torchrun --nproc-per-node N tools/reference_logps.py <training flags> --load REF_CKPT \\
        --output data/pref_reference_logps.npz
    ... megatron_ext.train <training flags> --preference-loss dpo \\
        --reference-logps data/pref_reference_logps.npz

The pass runs the preference objective's own forward step (same masks, same CP slicing, same
vocab-parallel log-probs) under any TP / PP / CP / DP layout, one row per sample, every row of the
dataset once. The file holds, per row and answer (chosen, then the first M rejected), the SUM of
the answer's token log-probs and its token count, with the dataset's fingerprint and M; training
refuses a file written for another dataset or for fewer rejected answers.

Positions: the reference sees each row at contiguous positions, so DPO / IPO runs must use
``--position-scheme contiguous`` (positions drawn per sample would differ from the reference's).
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

from megatron_ext.errors import ArgumentError

FORMAT = "megatron_ext reference logps v1"


class ReferenceFileError(ArgumentError):
    """A --reference-logps file that cannot serve this run (checked while the flags are read)."""


def save(path: str, sums: np.ndarray, counts: np.ndarray, fingerprint: str,
         num_rejected: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, format=np.array(FORMAT), sums=sums, counts=counts,
             fingerprint=np.array(fingerprint), num_rejected=np.array(num_rejected))
    os.replace(tmp, path)


def read_header(path: str) -> Tuple[str, int]:
    """(dataset fingerprint, rejected answers per row) of a reference file."""
    if not os.path.isfile(path):
        raise ReferenceFileError(f"--reference-logps {path}: no such file; write it with "
                                 "tools/reference_logps.py")
    try:
        with np.load(path) as saved:
            if str(saved["format"]) != FORMAT:
                raise KeyError("format")
            return str(saved["fingerprint"]), int(saved["num_rejected"])
    except (KeyError, ValueError, OSError) as err:
        raise ReferenceFileError(f"--reference-logps {path} is not a file written by "
                                 f"tools/reference_logps.py ({err})") from None


def check(path: str, fingerprint: str, num_rejected: int, prefix: str) -> None:
    """Refuse a reference file written for other data or fewer rejected answers."""
    saved_fingerprint, saved_rejected = read_header(path)
    if saved_fingerprint != fingerprint:
        raise ReferenceFileError(f"--reference-logps {path} was computed for another dataset than "
                                 f"--data-path {prefix} (content fingerprints differ); recompute "
                                 "it with tools/reference_logps.py on this dataset")
    if saved_rejected < num_rejected:
        raise ReferenceFileError(f"--reference-logps {path} holds {saved_rejected} rejected "
                                 f"answers per row, the run trains on --num-rejected "
                                 f"{num_rejected}; recompute it with --num-rejected {num_rejected}")


def load(path: str, num_rejected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sums, means) [rows, 1 + num_rejected], float64 (``check`` has validated the file)."""
    with np.load(path) as saved:
        sums = torch.from_numpy(saved["sums"][:, :1 + num_rejected].astype(np.float64))
        counts = torch.from_numpy(saved["counts"][:, :1 + num_rejected].astype(np.float64))
    return sums, sums / counts


# ------------------------------------------------------------------------------------------------
# Computing the file
# ------------------------------------------------------------------------------------------------

def _scorer_class():
    from megatron_ext.objectives.preference_step import PreferenceObjective

    class ReferenceScorer(PreferenceObjective):
        """The preference step's forward pass; its loss function records the answer sums."""

        collected: Dict[int, Tuple[List[float], List[int]]]

        def loss(self, scored, batch_size, logits):
            from megatron.core import parallel_state, tensor_parallel

            from megatron_ext.objectives.preference_loss import answer_log_prob_sums

            token_losses = tensor_parallel.vocab_parallel_cross_entropy(
                logits.float(), scored["labels"].view(1, -1))[0]
            sums = answer_log_prob_sums(-token_losses.double(), scored["rows"],
                                        scored["branches"], batch_size, self.num_branches,
                                        parallel_state.get_context_parallel_group())
            keeper = (parallel_state.get_context_parallel_rank() == 0
                      and parallel_state.get_tensor_model_parallel_rank() == 0)
            if keeper:
                for row, values, counts in zip(scored["row_ids"].tolist(), sums.tolist(),
                                               scored["counts"].tolist()):
                    self.collected[int(row)] = (values, counts)
            zero = logits.sum() * 0.0
            return zero, torch.tensor(0, dtype=torch.int, device=logits.device), {}

    return ReferenceScorer


def compute(cfg, output: str, progress: bool = True) -> Dict:
    """Score every row of the run's preference dataset with the model under --load; rank 0
    writes ``output``. Returns a summary (rows, answers per row, seconds)."""
    import time

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from tqdm import tqdm

    from megatron_ext import parallel
    from megatron_ext.checkpoints import checkpointing
    from megatron_ext.data.gpt_data import BatchLayout, MicroBatchIterator
    from megatron_ext.data.preference_samples import (PreferenceConfig, PreferenceDataset,
                                                      PreferenceRows)
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.model import build_model, transformer_config
    from megatron_ext.model.attention_backends import plan_attention
    from megatron_ext.objectives.preference_loss import PreferenceLossConfig

    start = time.perf_counter()
    options = cfg.objective.options
    _, plat = parallel.initialize(cfg.layout.tp, cfg.layout.pp, cfg.layout.cp,
                                  device=cfg.distributed.device,
                                  timeout_minutes=cfg.distributed.distributed_timeout_minutes)
    try:
        device = plat.device(torch.cuda.current_device() if not plat.is_cpu else 0)
        tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        cfg = cfg.with_vocab(checkpointing.embedding_rows(
            cfg.checkpoint.load, tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
            cfg.layout.tp))
        config = transformer_config(cfg.model, cfg.layout, plat.is_cpu)
        config.perform_initialization = False  # every weight comes from the checkpoint
        plan = plan_attention(cfg.model, cfg.layout, plat.is_cpu, training=False,
                              document_masks=cfg.document_masking_source)
        model = build_model(cfg.model, cfg.layout, config, plat.is_cpu, plan).to(device).eval()
        checkpointing.load(cfg.checkpoint.load, [model], None, None, cfg.model,
                           checkpointing.WEIGHTS_ONLY)

        rows = PreferenceRows(cfg.data.data_blend[0][0])
        dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                       parallel_state.get_data_parallel_rank())
        micro = cfg.training.micro_batch_size
        iterations = math.ceil(len(rows) / (micro * dp))
        pad = tokenizer.pad if tokenizer.pad is not None and tokenizer.pad >= 0 else tokenizer.eod
        dataset = PreferenceDataset(
            rows, np.arange(len(rows)), iterations * micro * dp,
            PreferenceConfig(seq_length=cfg.model.seq_length, num_rejected=options.num_rejected,
                             layout=options.preference_packing, position_scheme="contiguous",
                             target_seq_length=cfg.data.target_seq_length,
                             seed=cfg.training.seed, pad_token=pad), "all")
        scorer = _scorer_class()(device, PreferenceLossConfig.from_options(options))
        scorer.collected = {}
        batches = MicroBatchIterator(dataset, BatchLayout(micro, dp, dp_rank, 1))
        schedule = get_forward_backward_func()
        bar = tqdm(total=iterations, unit="batch", desc="reference logps",
                   disable=not (progress and parallel.is_rank0()))
        with torch.no_grad():
            for _ in range(iterations):
                schedule(forward_step_func=scorer.forward_step, data_iterator=batches,
                         model=[model], num_microbatches=1, seq_length=cfg.model.seq_length,
                         micro_batch_size=micro, forward_only=True)
                bar.update(1)
        bar.close()
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, scorer.collected)
        summary = {}
        if parallel.is_rank0():
            merged = {row: value for part in gathered for row, value in part.items()}
            missing = sorted(set(range(len(rows))) - set(merged))
            if missing:
                raise RuntimeError(f"internal: rows {missing[:5]} were not scored")
            sums = np.array([merged[r][0] for r in range(len(rows))], dtype=np.float64)
            counts = np.array([merged[r][1] for r in range(len(rows))], dtype=np.int64)
            save(output, sums, counts, rows.fingerprint(), options.num_rejected)
            summary = {"output": os.path.abspath(output), "rows": len(rows),
                       "answers_per_row": 1 + options.num_rejected,
                       "seconds": round(time.perf_counter() - start, 2)}
        return summary
    finally:
        parallel.destroy()
