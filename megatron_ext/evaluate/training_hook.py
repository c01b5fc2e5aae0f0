"""The evaluation tasks during training, on the in-memory model, at every ``--eval-interval``.

Wiring (two lines):

    train.main:                      arguments.parse(argv, providers=[training_hook.PROVIDER])
    train loop, at --eval-interval:  training_hook.run_during_training(s.model, cfg, s.iteration, writer)

The provider adds the ``--eval-tasks`` flags to the trainer's parser and files them as
``cfg.extras["eval_tasks"]`` (``EvalTasksOptions``); the trainer's core never imports this module.

``run_during_training`` does nothing without ``--eval-tasks``. Otherwise it runs the tasks under the
training layout (same TP / PP / CP slicing; DP ranks split the samples), logs one line, writes one
metrics record ``{"kind": "eval_tasks", "iteration": N, "passkey/1024": 0.6, ...}`` (TensorBoard
tags ``eval_tasks/passkey/1024``...) and returns the flat metrics. It touches no random state the
training loop uses (haystacks have their own generators; evaluation forward passes draw nothing),
so a run with evaluation trains exactly like one without.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Dict, List, Optional, Tuple

from megatron_ext.config import ArgsProvider, RunConfig
from megatron_ext.evaluate.options import parse_depths, parse_lengths
from megatron_ext.evaluate.tasks import TASKS, EvalConfig, flat_metrics
from megatron_ext.errors import UserError

_CACHE: Dict[tuple, tuple] = {}  # (tokenizer, data) -> (tokenizer, corpus): tokenize once per run


def _task_list(text: str) -> List[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(TASKS)}")
    return tasks


def _lengths(text: str) -> List[int]:
    try:
        return parse_lengths(text, "--eval-lengths")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _depths(text: str) -> List[float]:
    try:
        depths = parse_depths(text, "--eval-depths")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be fractions in [0, 1], got {text!r}")
    return depths


def _existing_data(path: str) -> str:
    if not (os.path.isfile(path) or (os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx"))):
        raise argparse.ArgumentTypeError(f"{path}: no such jsonl file or indexed-dataset prefix "
                                         f"({path}.bin/.idx)")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("long-context tasks during training (python -m megatron_ext.evaluate)")
    g.add_argument("--eval-tasks", type=_task_list, default=None,
                   help=f"comma-separated, from {', '.join(TASKS)}; run at every --eval-interval "
                        f"and logged to TensorBoard and --metrics-jsonl (needs --eval-tasks-data)")
    g.add_argument("--eval-lengths", type=_lengths, default=None,
                   help="comma-separated lengths in tokens (4K = 4096); default: --seq-length")
    g.add_argument("--eval-depths", type=_depths, default=[0.0, 0.5, 1.0],
                   help="needle depths (fractions of the context)")
    g.add_argument("--eval-num-samples", type=int, default=4,
                   help="ppl-by-position: documents per length; needle tasks: haystacks per "
                        "(length, depth)")
    g.add_argument("--eval-tasks-data", type=_existing_data, default=None,
                   help="held-out jsonl ('text' rows) or indexed-dataset prefix for the tasks")
    g.add_argument("--eval-chat-template", action="store_true",
                   help="wrap needle prompts in the tokenizer's chat template")


@dataclasses.dataclass(frozen=True)
class EvalTasksOptions:
    """The ``--eval-*`` task flags as parsed (``cfg.extras["eval_tasks"]``)."""

    eval_tasks: Optional[Tuple[str, ...]] = None
    eval_lengths: Optional[Tuple[int, ...]] = None
    eval_depths: Tuple[float, ...] = (0.0, 0.5, 1.0)
    eval_num_samples: int = 4
    eval_tasks_data: Optional[str] = None
    eval_chat_template: bool = False

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "EvalTasksOptions":
        def frozen(value):
            return tuple(value) if value is not None else None

        return cls(frozen(args.eval_tasks), frozen(args.eval_lengths), tuple(args.eval_depths),
                   args.eval_num_samples, args.eval_tasks_data, args.eval_chat_template)


def eval_config(cfg: RunConfig) -> Optional[EvalConfig]:
    """The tasks' configuration, or None without --eval-tasks; UserError names a bad flag."""
    options = cfg.extras.get(PROVIDER.name)
    if options is None or not options.eval_tasks:
        return None
    if not options.eval_tasks_data:
        raise UserError("--eval-tasks needs --eval-tasks-data (a held-out jsonl with 'text' rows "
                         "or an indexed-dataset prefix)")
    if not cfg.training.eval_interval:
        raise UserError("--eval-tasks runs at --eval-interval; set --eval-interval N")
    lengths = options.eval_lengths or [cfg.model.seq_length]
    cp = cfg.layout.cp
    for length in lengths:
        if length > cfg.model.max_position_embeddings:
            raise UserError(f"--eval-lengths {length} exceeds --max-position-embeddings "
                             f"({cfg.model.max_position_embeddings})")
        if cp > 1 and length % (2 * cp) != 0:
            raise UserError(f"--eval-lengths {length} is not divisible by 2 x "
                             f"--context-parallel-size = {2 * cp}")
    return EvalConfig(tasks=list(options.eval_tasks), lengths=list(lengths),
                      depths=list(options.eval_depths), num_samples=options.eval_num_samples,
                      seed=cfg.training.seed, chat_template=options.eval_chat_template)


def _tokenizer_and_corpus(cfg: RunConfig):
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.evaluate.corpus import EvalCorpus

    data = cfg.extras[PROVIDER.name].eval_tasks_data
    key = (cfg.data.tokenizer_type, cfg.data.tokenizer_model, data)
    if key not in _CACHE:
        tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        _CACHE[key] = (tokenizer, EvalCorpus(data, tokenizer, "--eval-tasks-data"))
    return _CACHE[key]


def run_during_training(model, cfg: RunConfig, iteration: int, writer) -> Dict[str, float]:
    """Run --eval-tasks on ``model`` (train.py's list of model chunks, or one module)."""
    from megatron_ext.evaluate.model_runner import ModelRunner
    from megatron_ext.evaluate.tasks import run_tasks
    from megatron_ext.model.output_rows import unwrap

    config = eval_config(cfg)
    if config is None:
        return {}
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if len(chunks) != 1:
        raise UserError("--eval-tasks supports one model chunk per rank (no virtual pipeline "
                         "stages)")
    module = unwrap(chunks[0])
    tokenizer, corpus = _tokenizer_and_corpus(cfg)
    device = next(module.parameters()).device
    runner = ModelRunner(module, device, min(tokenizer.vocab_size, cfg.model.padded_vocab_size))
    was_training = module.training
    module.eval()
    try:
        results = run_tasks(runner, corpus, tokenizer, config)
    finally:
        module.train(was_training)
    metrics = flat_metrics(results)
    writer.log(f" long-context eval at iteration {iteration} | "
               + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    writer.record({"kind": "eval_tasks", "iteration": iteration, **metrics}, iteration,
                  prefix="eval_tasks")
    return metrics


PROVIDER = ArgsProvider("eval_tasks", add_arguments, EvalTasksOptions.from_namespace)

__all__ = ["PROVIDER", "EvalTasksOptions", "add_arguments", "eval_config", "run_during_training"]
