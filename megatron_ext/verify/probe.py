"""One layout's run for the comparison: ``torchrun ... -m megatron_ext.verify.probe OUT FLAGS...``.

Builds the run exactly as ``megatron_ext.train`` does (``train.setup``) from the training FLAGS and
trains ``--train-iters`` iterations with ``train.train``, so the numbers are the trainer's own.
Writes to the directory OUT:

    metrics.jsonl   the trainer's per-iteration records (loss, grad_norm, ...)
    grads.pt        {global parameter name: fp32 gradient of global shape} of iteration 1, taken
                    right after Megatron's gradient finalisation (before clipping and the update)
    init/           with --save-initial-checkpoint: the weights before iteration 1 (torch_dist)

Checkpoint saving, evaluation and TensorBoard of the flags are switched off: a probe only measures.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import List

import torch
from megatron.core.utils import get_model_config

from megatron_ext import arguments, parallel, train
from megatron_ext.checkpoints import checkpointing
from megatron_ext.errors import UserError, report
from megatron_ext.evaluate import training_hook
from megatron_ext.metrics import MetricsWriter
from megatron_ext.verify.gradients import complete_distributed_optimizer_grads, global_gradients

SAVE_INITIAL = "--save-initial-checkpoint"


def probe_config(cfg, out: str):
    return dataclasses.replace(
        cfg,
        checkpoint=dataclasses.replace(cfg.checkpoint, save=None),
        logging=dataclasses.replace(cfg.logging, tensorboard_dir=None,
                                    metrics_jsonl=os.path.join(out, "metrics.jsonl")),
        training=dataclasses.replace(cfg.training, eval_interval=None, exit_interval=None))


def capture_first_gradients(s: train.TrainingSetup, out: str) -> None:
    """Wrap the schedule's gradient finalisation: on iteration 1, write the global gradients."""
    config = get_model_config(s.model[0])
    finalize = config.finalize_model_grads_func
    state = {"done": False}

    def finalize_and_capture(*args, **kwargs):
        result = finalize(*args, **kwargs)
        if not state["done"]:
            state["done"] = True
            complete_distributed_optimizer_grads(s.model[0])
            grads = global_gradients(s.model[0].module)
            if grads is not None:
                torch.save(grads, os.path.join(out, "grads.pt"))
        return result

    config.finalize_model_grads_func = finalize_and_capture


def main(argv: List[str]) -> int:
    out, *flags = argv
    save_initial = SAVE_INITIAL in flags
    flags = [f for f in flags if f != SAVE_INITIAL]
    os.makedirs(out, exist_ok=True)
    cfg = probe_config(arguments.parse(flags, providers=[training_hook.PROVIDER]), out)
    try:
        return _probe(cfg, out, save_initial)
    except UserError as err:
        return report("megatron_ext.verify.probe", err)


def _probe(cfg, out: str, save_initial: bool) -> int:
    layout = cfg.layout
    _, plat = parallel.initialize(layout.tp, layout.pp, layout.cp, device=cfg.distributed.device,
                                  hierarchical_cp_sizes=layout.hierarchical_context_parallel_sizes)
    try:
        s = train.setup(cfg, plat)
        if save_initial:
            checkpointing.save(os.path.join(out, "init"), s.iteration, s.model, s.optimizer,
                               s.scheduler, 0, s.cfg.model)
        capture_first_gradients(s, out)
        if parallel.is_rank0() and os.path.exists(s.cfg.logging.metrics_jsonl):
            os.remove(s.cfg.logging.metrics_jsonl)  # a rerun into OUT starts a new record
        writer = MetricsWriter(parallel.is_rank0(), s.cfg.logging.metrics_jsonl, None)
        train.train(s, writer)
        writer.close()
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
