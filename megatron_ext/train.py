"""Pretraining loop on Megatron-Core: ``torchrun --nproc-per-node N -m megatron_ext.train ...``.

The story, top to bottom: parse flags -> process groups -> tokenizer and datasets -> model wrapped
in DDP -> optimizer and LR schedule -> resume -> for each iteration: one global batch through
Megatron-Core's forward/backward schedule, optimizer step, log, evaluate, save.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import arguments, checkpointing, objectives, parallel
from megatron_ext.data.gpt_data import BatchLayout, MicroBatchIterator
from megatron_ext.data.tokenizer import build_tokenizer, padded_vocab_size
from megatron_ext.errors import UserError, report
from megatron_ext.evaluate import training_hook
from megatron_ext.losses import reduce_reports
from megatron_ext.metrics import MetricsWriter
from megatron_ext.model import build_model, transformer_config
from megatron_ext.model.attention_backends import describe_what_ran, plan_attention, what_ran


@dataclasses.dataclass
class TrainingSetup:
    args: argparse.Namespace
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: OptimizerParamScheduler
    objective: object  # the objective's per-micro-batch strategy (megatron_ext/objectives)
    train_data: object
    valid_data: Optional[object]
    layout: BatchLayout
    iteration: int = 0


def set_seeds(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Megatron's tracker: a TP-rank-specific stream for dropout inside tensor-parallel regions.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model_and_optimizer(args, device, on_cpu: bool):
    config = transformer_config(args, on_cpu)
    plan = plan_attention(args, on_cpu, training=not args.skip_train)
    module = build_model(args, config, on_cpu, args.padded_vocab_size, plan).to(device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            fp16=args.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters > 0 else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, args.lr_decay_iters // 10) if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
    )
    # Hooks the schedule calls: loss scaling (fp16), grad sync, per-token grad normalisation.
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler


def setup(args: argparse.Namespace, plat) -> TrainingSetup:
    training_hook.eval_config(args)  # bad --eval-tasks flags fail before any work
    device = plat.device(torch.cuda.current_device() if not plat.is_cpu else 0)
    set_seeds(args.seed)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    args.padded_vocab_size = embedding_rows(args, tokenizer)
    model, optimizer, scheduler = build_model_and_optimizer(args, device, plat.is_cpu)

    iteration, consumed = 0, 0
    if args.load:
        iteration, consumed = checkpointing.load(args.load, model, optimizer, scheduler, args)
    if consumed != iteration * args.global_batch_size:
        raise checkpointing.CheckpointError(
            f"checkpoint consumed {consumed} samples at iteration {iteration}, which does not match "
            f"--global-batch-size {args.global_batch_size}; resume with the batch size it was saved with")

    layout = BatchLayout(args.micro_batch_size, parallel_state.get_data_parallel_world_size(),
                         parallel_state.get_data_parallel_rank(), args.num_microbatches)
    eval_runs = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    eval_runs = max(eval_runs, int(args.skip_train))
    train_ds, valid_ds, _ = objectives.datasets_from_args(
        args, tokenizer, [args.train_iters * args.global_batch_size,
                          args.eval_iters * args.global_batch_size if eval_runs else 0, 0])
    if train_ds is None and args.train_iters > 0 and not args.skip_train:
        raise UserError(f"--split {args.split} leaves no training data")
    if (eval_runs or args.skip_train) and valid_ds is None:
        raise UserError(f"evaluation is asked for but --split {args.split} leaves no validation "
                         "data")
    objective = objectives.get(args.objective).build(args, device)
    return TrainingSetup(args, model, optimizer, scheduler, objective, train_ds, valid_ds, layout,
                         iteration)


def embedding_rows(args: argparse.Namespace, tokenizer) -> int:
    """Padded vocabulary: the tokenizer's, or a loaded checkpoint's when that is larger."""
    rows = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                             args.tensor_model_parallel_size)
    saved = checkpointing.saved_padded_vocab_size(args.load) if args.load else None
    if saved is not None and saved != rows:
        if saved < tokenizer.vocab_size or saved % args.tensor_model_parallel_size:
            raise checkpointing.CheckpointError(
                f"--load {args.load} has {saved} embedding rows, which cannot serve the "
                f"{tokenizer.vocab_size}-token --tokenizer-model under "
                f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
        rows = saved
    return rows


def run_schedule(s: TrainingSetup, data_iterator, forward_only: bool) -> Dict[str, float]:
    reports = get_forward_backward_func()(
        forward_step_func=s.objective.forward_step,
        data_iterator=data_iterator,
        model=s.model,
        num_microbatches=s.args.num_microbatches,
        seq_length=s.args.seq_length,
        micro_batch_size=s.args.micro_batch_size,
        forward_only=forward_only,
    )
    # Reports exist on the last pipeline stage; share them so every rank logs the same numbers.
    summary = reduce_reports(reports, parallel_state.get_data_parallel_group(with_context_parallel=True))
    return broadcast_from_last_stage(summary)


def broadcast_from_last_stage(summary: Dict[str, float]) -> Dict[str, float]:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return summary
    holder = [summary]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast_object_list(holder, src=last,
                                            group=parallel_state.get_pipeline_model_parallel_group())
    return holder[0]


def train_step(s: TrainingSetup, data_iterator) -> Dict[str, float]:
    for chunk in s.model:
        chunk.zero_grad_buffer()
    s.optimizer.zero_grad()
    losses = run_schedule(s, data_iterator, forward_only=False)
    update_ok, grad_norm, _ = s.optimizer.step()
    if update_ok:
        s.scheduler.step(increment=1)
    losses["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    losses["skipped"] = not update_ok
    return losses


def evaluate(s: TrainingSetup) -> Dict[str, float]:
    for chunk in s.model:
        chunk.eval()
    data = MicroBatchIterator(s.valid_data, s.layout, start_iteration=0)
    totals = []
    with torch.no_grad():
        for _ in range(s.args.eval_iters):
            totals.append(run_schedule(s, data, forward_only=True))
    for chunk in s.model:
        chunk.train()
    key = s.objective.loss_key
    tokens = sum(t[key + " tokens"] for t in totals)
    loss = sum(t[key] * t[key + " tokens"] for t in totals) / max(tokens, 1)
    return {"loss": loss, "tokens": tokens}


def train(s: TrainingSetup, writer: MetricsWriter) -> List[dict]:
    """Runs iterations up to --train-iters (or --exit-interval); returns their records."""
    args = s.args
    data = MicroBatchIterator(s.train_data, s.layout, start_iteration=s.iteration)
    tokens_per_iter = args.global_batch_size * args.seq_length
    last_iter = min(args.train_iters, args.exit_interval or args.train_iters)
    records = []
    window_s, window_iters = 0.0, 0  # step time only: evaluation and saving are not counted
    run_start = time.perf_counter()
    while s.iteration < last_iter:
        lr = s.optimizer.param_groups[0]["lr"]
        step_start = time.perf_counter()
        out = train_step(s, data)
        step_s = time.perf_counter() - step_start
        s.iteration += 1
        window_s, window_iters = window_s + step_s, window_iters + 1
        key = s.objective.loss_key
        # loss_tokens: the loss's denominator (scored tokens; rows for preference losses).
        record = {"iteration": s.iteration, "loss": out[key], "lr": lr,
                  "grad_norm": out["grad_norm"], "tokens": tokens_per_iter * s.iteration,
                  "loss_tokens": out[key + " tokens"], "step_s": round(step_s, 4),
                  "tokens_per_s": round(tokens_per_iter / step_s, 2),
                  "elapsed_s": round(time.perf_counter() - run_start, 4),
                  **{metric: out[metric] for metric in s.objective.metrics}}
        records.append(record)
        writer.record(record, s.iteration)
        if s.iteration % args.log_interval == 0 or s.iteration == last_iter:
            writer.log(f" iteration {s.iteration:8d}/{args.train_iters:8d} | consumed samples: "
                       f"{data.consumed_samples:10d} | elapsed time per iteration (ms): "
                       f"{1000 * window_s / window_iters:.1f} | tokens/s: "
                       f"{tokens_per_iter * window_iters / window_s:.1f} | learning rate: {lr:.6E} | "
                       f"{key}: {out[key]:.6E} | "
                       + "".join(f"{m}: {out[m]:.4f} | " for m in s.objective.metrics)
                       + f"grad norm: {out['grad_norm']:.4f} | skipped: {int(out['skipped'])}")
            window_s, window_iters = 0.0, 0
        if args.eval_interval and s.iteration % args.eval_interval == 0:
            result = evaluate(s)
            writer.log(f" validation at iteration {s.iteration} | {s.objective.loss_key}: "
                       f"{result['loss']:.6E}")
            writer.record({"kind": "eval", "iteration": s.iteration, "eval_loss": result["loss"],
                           "eval_tokens": result["tokens"]}, s.iteration, prefix="eval")
            training_hook.run_during_training(s.model, args, s.iteration, writer)
        if args.save and args.save_interval and s.iteration % args.save_interval == 0:
            save(s, writer)
    if args.save and (not args.save_interval or s.iteration % args.save_interval != 0):
        save(s, writer)
    return records


def save(s: TrainingSetup, writer: MetricsWriter) -> None:
    start = time.perf_counter()
    path = checkpointing.save(s.args.save, s.iteration, s.model, s.optimizer, s.scheduler,
                              s.iteration * s.args.global_batch_size, s.args)
    writer.log(f" saved checkpoint at iteration {s.iteration} to {path} "
               f"({time.perf_counter() - start:.1f}s)")


def main(argv: Optional[List[str]] = None) -> int:
    args = arguments.parse(argv)
    try:
        return _run(args)
    except UserError as err:
        # Input problems (bad checkpoint, empty split...): one clear line, not a traceback per
        # rank. Anything else is a bug and keeps its traceback.
        return report("megatron_ext.train", err)


def _run(args: argparse.Namespace) -> int:
    info, plat = parallel.initialize(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        args.context_parallel_size, device=args.device,
        timeout_minutes=args.distributed_timeout_minutes,
        hierarchical_cp_sizes=args.hierarchical_context_parallel_sizes)
    try:
        s = setup(args, plat)
        writer = MetricsWriter(parallel.is_rank0(), args.metrics_jsonl, args.tensorboard_dir)
        ran = what_ran(s.model[0], plat.device_type, args.context_parallel_size)
        writer.log(f" megatron_ext: {info.world_size} ranks on {plat.device_type}/{plat.backend} | "
                   f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
                   f"CP={args.context_parallel_size} DP={args.data_parallel_size} | "
                   f"{sum(p.numel() for p in s.model[0].parameters())} parameters on rank 0 | "
                   f"starting at iteration {s.iteration}")
        writer.log(" " + describe_what_ran(ran))
        writer.record({"kind": "run", "iteration": s.iteration, **ran}, s.iteration, prefix="run")
        if args.skip_train:
            result = evaluate(s)
            writer.log(f" evaluation only | {s.objective.loss_key}: {result['loss']:.6E} | "
                       f"{result['tokens']} tokens at --seq-length {args.seq_length}")
            writer.record({"kind": "eval", "iteration": s.iteration, "eval_loss": result["loss"],
                           "eval_tokens": result["tokens"]}, s.iteration, prefix="eval")
            writer.close()
            return 0
        records = train(s, writer)
        if records:
            tokens = len(records) * args.global_batch_size * args.seq_length
            step_s = sum(r["step_s"] for r in records)
            writer.log(f" done: {len(records)} iterations | loss first {records[0]['loss']:.4f} "
                       f"last {records[-1]['loss']:.4f} | {tokens / step_s:.1f} tokens/s")
        writer.close()
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
