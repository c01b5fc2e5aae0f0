"""Pretraining loop on Megatron-Core: ``torchrun --nproc-per-node N -m megatron_ext.train ...``.

The story, top to bottom: parse flags -> process groups -> tokenizer and datasets -> model wrapped
in DDP -> optimizer and LR schedule -> resume -> for each iteration: one global batch through
Megatron-Core's forward/backward schedule, optimizer step, log, evaluate, save.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import arguments, objectives, parallel
from megatron_ext.checkpoints import checkpointing
from megatron_ext.config import RunConfig
from megatron_ext.data.gpt_data import BatchLayout, MicroBatchIterator
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.errors import UserError, report
from megatron_ext.evaluate import training_hook
from megatron_ext.losses import reduce_reports
from megatron_ext.metrics import MetricsWriter
from megatron_ext.model import build_model, transformer_config
from megatron_ext.model.attention_backends import describe_what_ran, plan_attention, what_ran


@dataclasses.dataclass
class TrainingSetup:
    cfg: RunConfig
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


def build_model_and_optimizer(cfg: RunConfig, device, on_cpu: bool):
    training = cfg.training
    config = transformer_config(cfg.model, cfg.layout, on_cpu)
    plan = plan_attention(cfg.model, cfg.layout, on_cpu, training=not training.skip_train,
                          document_masks=cfg.document_masking_source)
    # init_seed: from scratch, the same weights under every layout (model/init.py).
    module = build_model(cfg.model, cfg.layout, config, on_cpu, plan,
                         init_seed=training.seed).to(device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=training.use_distributed_optimizer,
    )
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=training.optimizer,
            sgd_momentum=training.sgd_momentum,
            lr=training.lr,
            min_lr=training.min_lr,
            weight_decay=training.weight_decay,
            adam_beta1=training.adam_beta1,
            adam_beta2=training.adam_beta2,
            adam_eps=training.adam_eps,
            clip_grad=training.clip_grad,
            loss_scale=training.loss_scale,
            initial_loss_scale=training.initial_loss_scale,
            min_loss_scale=training.min_loss_scale,
            loss_scale_window=training.loss_scale_window,
            hysteresis=training.hysteresis,
            bf16=cfg.model.bf16,
            fp16=cfg.model.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=training.use_distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if training.lr_warmup_iters > 0 else training.lr,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters,
        lr_decay_steps=training.lr_decay_iters,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=(max(1, training.lr_decay_iters // 10)
                         if training.lr_decay_style == "WSD" else None),
        lr_wsd_decay_style="linear" if training.lr_decay_style == "WSD" else None,
    )
    # Hooks the schedule calls: loss scaling (fp16), grad sync, per-token grad normalisation.
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler


def setup(cfg: RunConfig, plat) -> TrainingSetup:
    training = cfg.training
    training_hook.eval_config(cfg)  # bad --eval-tasks flags fail before any work
    device = plat.device(torch.cuda.current_device() if not plat.is_cpu else 0)
    set_seeds(training.seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    # The embedding rows are known only now: a new config, not an edit of the parsed one.
    cfg = cfg.with_vocab(checkpointing.embedding_rows(
        cfg.checkpoint.load, tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
        cfg.layout.tp))
    model, optimizer, scheduler = build_model_and_optimizer(cfg, device, plat.is_cpu)

    iteration, consumed = 0, 0
    if cfg.checkpoint.load:
        iteration, consumed = checkpointing.load(cfg.checkpoint.load, model, optimizer, scheduler,
                                                cfg.model, cfg.checkpoint)
    if consumed != iteration * training.global_batch_size:
        raise checkpointing.CheckpointError(
            f"checkpoint consumed {consumed} samples at iteration {iteration}, which does not "
            f"match --global-batch-size {training.global_batch_size}; resume with the batch size "
            f"it was saved with")

    layout = BatchLayout(training.micro_batch_size, parallel_state.get_data_parallel_world_size(),
                         parallel_state.get_data_parallel_rank(), training.num_microbatches)
    eval_runs = ((training.train_iters // training.eval_interval + 1) if training.eval_interval
                 else 0)
    eval_runs = max(eval_runs, int(training.skip_train))
    train_ds, valid_ds, _ = objectives.datasets_for(
        cfg, tokenizer, [training.train_iters * training.global_batch_size,
                          training.eval_iters * training.global_batch_size if eval_runs else 0, 0])
    if train_ds is None and training.train_iters > 0 and not training.skip_train:
        raise UserError(f"--split {cfg.data.split} leaves no training data")
    if (eval_runs or training.skip_train) and valid_ds is None:
        raise UserError(f"evaluation is asked for but --split {cfg.data.split} leaves no "
                        "validation data")
    objective = objectives.get(cfg.objective.name).build(cfg, device)
    return TrainingSetup(cfg, model, optimizer, scheduler, objective, train_ds, valid_ds, layout,
                         iteration)


def run_schedule(s: TrainingSetup, data_iterator, forward_only: bool) -> Dict[str, float]:
    reports = get_forward_backward_func()(
        forward_step_func=s.objective.forward_step,
        data_iterator=data_iterator,
        model=s.model,
        num_microbatches=s.cfg.training.num_microbatches,
        seq_length=s.cfg.model.seq_length,
        micro_batch_size=s.cfg.training.micro_batch_size,
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
    # As Megatron-LM logs it: the scale after this step's update (fp16 halves it on overflow).
    losses["loss_scale"] = float(s.optimizer.get_loss_scale())
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
        for _ in range(s.cfg.training.eval_iters):
            totals.append(run_schedule(s, data, forward_only=True))
    for chunk in s.model:
        chunk.train()
    key = s.objective.loss_key
    tokens = sum(t[key + " tokens"] for t in totals)
    loss = sum(t[key] * t[key + " tokens"] for t in totals) / max(tokens, 1)
    return {"loss": loss, "tokens": tokens}


def train(s: TrainingSetup, writer: MetricsWriter) -> List[dict]:
    """Runs iterations up to --train-iters (or --exit-interval); returns their records."""
    cfg, training, ckpt = s.cfg, s.cfg.training, s.cfg.checkpoint
    data = MicroBatchIterator(s.train_data, s.layout, start_iteration=s.iteration)
    tokens_per_iter = training.global_batch_size * cfg.model.seq_length
    last_iter = min(training.train_iters, training.exit_interval or training.train_iters)
    records = []
    window_s, window_iters = 0.0, 0  # step time only: evaluation and saving are not counted
    window_skipped = 0  # skipped (overflowing fp16) iterations since the last log line
    run_start = time.perf_counter()
    # --async-save: Megatron-Core's queue of shard writers in flight (forked, one per rank).
    async_saves = AsyncCallsQueue() if ckpt.save and ckpt.async_save else None
    while s.iteration < last_iter:
        if async_saves is not None:
            # Publishes a finished save (a collective: every rank asks at the same iteration).
            async_saves.maybe_finalize_async_calls(blocking=False)
        lr = s.optimizer.param_groups[0]["lr"]
        step_start = time.perf_counter()
        out = train_step(s, data)
        step_s = time.perf_counter() - step_start
        s.iteration += 1
        window_s, window_iters = window_s + step_s, window_iters + 1
        window_skipped += int(out["skipped"])
        key = s.objective.loss_key
        # loss_tokens: the loss's denominator (scored tokens; rows for preference losses).
        record = {"iteration": s.iteration, "loss": out[key], "lr": lr,
                  "grad_norm": out["grad_norm"], "tokens": tokens_per_iter * s.iteration,
                  "loss_tokens": out[key + " tokens"],
                  # Megatron-LM's names: an fp16 step whose gradients overflowed is skipped.
                  "loss_scale": out["loss_scale"], "skipped_iter": int(out["skipped"]),
                  "step_s": round(step_s, 4),
                  "tokens_per_s": round(tokens_per_iter / step_s, 2),
                  "elapsed_s": round(time.perf_counter() - run_start, 4),
                  **{metric: out[metric] for metric in s.objective.metrics}}
        records.append(record)
        writer.record(record, s.iteration)
        if s.iteration % cfg.logging.log_interval == 0 or s.iteration == last_iter:
            writer.log(f" iteration {s.iteration:8d}/{training.train_iters:8d} | consumed samples: "
                       f"{data.consumed_samples:10d} | elapsed time per iteration (ms): "
                       f"{1000 * window_s / window_iters:.1f} | tokens/s: "
                       f"{tokens_per_iter * window_iters / window_s:.1f} | learning rate: {lr:.6E} | "
                       f"{key}: {out[key]:.6E} | "
                       + "".join(f"{m}: {out[m]:.4f} | " for m in s.objective.metrics)
                       + f"loss scale: {out['loss_scale']:.1f} | grad norm: "
                       f"{out['grad_norm']:.4f} | number of skipped iterations: {window_skipped}")
            window_s, window_iters, window_skipped = 0.0, 0, 0
        if training.eval_interval and s.iteration % training.eval_interval == 0:
            result = evaluate(s)
            writer.log(f" validation at iteration {s.iteration} | {s.objective.loss_key}: "
                       f"{result['loss']:.6E}")
            writer.record({"kind": "eval", "iteration": s.iteration, "eval_loss": result["loss"],
                           "eval_tokens": result["tokens"]}, s.iteration, prefix="eval")
            training_hook.run_during_training(s.model, cfg, s.iteration, writer)
        if ckpt.save and ckpt.save_interval and s.iteration % ckpt.save_interval == 0:
            save(s, writer, async_saves)
    if ckpt.save and (not ckpt.save_interval or s.iteration % ckpt.save_interval != 0):
        save(s, writer, async_saves)
    if async_saves is not None:
        async_saves.maybe_finalize_async_calls(blocking=True)  # the run ends with its last save
    return records


def save(s: TrainingSetup, writer: MetricsWriter, async_saves=None) -> None:
    """Save now (or, with --async-save, stage now and publish when the writers finish)."""
    if async_saves is not None and async_saves.get_num_unfinalized_calls():
        # One save in flight at a time, as in Megatron-LM: wait for the previous one.
        async_saves.maybe_finalize_async_calls(blocking=True)
    start, iteration = time.perf_counter(), s.iteration

    def published(path: str) -> None:
        writer.log(f" saved checkpoint at iteration {iteration} to {path} "
                   f"({time.perf_counter() - start:.1f}s{', asynchronous' if async_saves else ''})")

    path = checkpointing.save(s.cfg.checkpoint.save, s.iteration, s.model, s.optimizer, s.scheduler,
                              s.iteration * s.cfg.training.global_batch_size, s.cfg.model,
                              keep_last=s.cfg.checkpoint.keep_last_n_checkpoints,
                              async_queue=async_saves, on_published=published)
    if async_saves is not None:
        writer.log(f" scheduled asynchronous checkpoint at iteration {iteration} to {path} "
                   f"({time.perf_counter() - start:.1f}s blocking)")


def main(argv: Optional[List[str]] = None) -> int:
    cfg = arguments.parse(argv, providers=[training_hook.PROVIDER])
    try:
        return _run(cfg)
    except UserError as err:
        # Input problems (bad checkpoint, empty split...): one clear line, not a traceback per
        # rank. Anything else is a bug and keeps its traceback.
        return report("megatron_ext.train", err)


def _run(cfg: RunConfig) -> int:
    info, plat = parallel.initialize(
        cfg.layout.tp, cfg.layout.pp, cfg.layout.cp, device=cfg.distributed.device,
        timeout_minutes=cfg.distributed.distributed_timeout_minutes,
        hierarchical_cp_sizes=cfg.layout.hierarchical_context_parallel_sizes)
    try:
        s = setup(cfg, plat)
        writer = MetricsWriter(parallel.is_rank0(), cfg.logging.metrics_jsonl,
                               cfg.logging.tensorboard_dir)
        ran = what_ran(s.model[0], plat.device_type, cfg.layout.cp)
        writer.log(f" megatron_ext: {info.world_size} ranks on {plat.device_type}/{plat.backend} | "
                   f"TP={cfg.layout.tp} PP={cfg.layout.pp} CP={cfg.layout.cp} DP={cfg.layout.dp} | "
                   f"{sum(p.numel() for p in s.model[0].parameters())} parameters on rank 0 | "
                   f"starting at iteration {s.iteration}")
        writer.log(" " + describe_what_ran(ran))
        writer.record({"kind": "run", "iteration": s.iteration, **ran}, s.iteration, prefix="run")
        if cfg.training.skip_train:
            result = evaluate(s)
            writer.log(f" evaluation only | {s.objective.loss_key}: {result['loss']:.6E} | "
                       f"{result['tokens']} tokens at --seq-length {cfg.model.seq_length}")
            writer.record({"kind": "eval", "iteration": s.iteration, "eval_loss": result["loss"],
                           "eval_tokens": result["tokens"]}, s.iteration, prefix="eval")
            writer.close()
            return 0
        records = train(s, writer)
        if records:
            tokens = len(records) * cfg.training.global_batch_size * cfg.model.seq_length
            step_s = sum(r["step_s"] for r in records)
            writer.log(f" done: {len(records)} iterations | loss first {records[0]['loss']:.4f} "
                       f"last {records[-1]['loss']:.4f} | {tokens / step_s:.1f} tokens/s")
        writer.close()
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
