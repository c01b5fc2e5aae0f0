"""Long-context evaluation of a Megatron checkpoint: ``python -m megatron_ext.evaluate``.

    torchrun --nproc-per-node 2 -m megatron_ext.evaluate $(cat ckpt/megatron_args.txt) \\
        --load ckpt --tokenizer-type HuggingFaceTokenizer --tokenizer-model HF_DIR \\
        --eval-data heldout.jsonl --output eval_out --context-parallel-size 2 \\
        --tasks ppl-by-position,passkey,niah,niah-multikey --lengths 4K,8K,16K

Model and parallelism flags are training's (any TP / PP / CP layout; remaining ranks are data
parallel and split the samples; --seq-length is not used, --lengths decides). Each sequence is one
micro-batch. Writes OUTPUT/results.json, one PNG per task and prints a one-screen summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence, Tuple

from megatron_ext import arguments
from megatron_ext.checkpoints import checkpoint_args, checkpointing, integrity
from megatron_ext.config import ModelConfig
from megatron_ext.model import attention_backends
from megatron_ext.errors import UserError, report
from megatron_ext.parallel.layout import Layout, launched_world_size
from megatron_ext.evaluate.options import parse_depths, parse_lengths  # noqa: F401 (public)
from megatron_ext.evaluate.tasks import DEFAULT_DEPTHS, TASKS, EvalConfig

PROG = "python -m megatron_ext.evaluate"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The usage example as written, and every flag's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,
                                formatter_class=_HelpFormatter)
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_checkpoint_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", required=True,
                   help="held-out documents and haystack text: a jsonl with 'text' rows or an "
                        "indexed-dataset prefix (PREFIX.bin/.idx from tools/preprocess_data.py)")
    g.add_argument("--output", required=True, help="directory for results.json and the PNGs")
    g.add_argument("--tasks", default="ppl-by-position,passkey",
                   help=f"comma-separated, from: {', '.join(TASKS)}")
    g.add_argument("--lengths", default="1024",
                   help="comma-separated sequence lengths in tokens; 4K = 4096")
    g.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="needle depths: fractions of the context (0 = start, 1 = end)")
    g.add_argument("--num-samples", type=int, default=10,
                   help="ppl-by-position: documents per length; needle tasks: haystacks per "
                        "(length, depth)")
    g.add_argument("--bucket-size", type=int, default=None,
                   help="ppl-by-position bucket width in tokens (default: longest length / 8, "
                        "at least 64)")
    g.add_argument("--seed", type=int, default=1234, help="haystacks are a function of it")
    g.add_argument("--chat-template", action="store_true",
                   help="wrap needle prompts in the tokenizer's chat template (instruct models)")
    g.add_argument("--tokenizer-type", required=True,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    g.add_argument("--tokenizer-model", required=True)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def finalize(args: argparse.Namespace, world_size: int
             ) -> Tuple[ModelConfig, Layout, EvalConfig]:
    """Validate everything that can be checked before any process group exists; the model and
    layout go through training's ``arguments.model_and_layout`` (same defaults, same rules)."""
    # Training's checkpoint flags are shared with training, but evaluation writes no checkpoint:
    # a flag that would be ignored is refused instead.
    for flag, value in (("--save", args.save), ("--save-interval", args.save_interval),
                        ("--keep-last-n-checkpoints", args.keep_last_n_checkpoints),
                        ("--async-save", args.async_save or None)):
        if value is not None:
            raise arguments.ArgumentError(f"{flag}: evaluation writes no checkpoint; drop it")
    lengths = parse_lengths(args.lengths)
    config = EvalConfig(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                        lengths=lengths, depths=parse_depths(args.depths),
                        num_samples=args.num_samples, seed=args.seed,
                        bucket_size=args.bucket_size, chat_template=args.chat_template)
    for length in lengths:
        Layout.from_args(args, world_size).check_sequence(length, flag="--lengths")
    longest = max(lengths)
    if args.max_position_embeddings is not None and longest > args.max_position_embeddings:
        raise arguments.ArgumentError(
            f"--lengths {longest} exceeds --max-position-embeddings "
            f"({args.max_position_embeddings}); evaluate shorter lengths or raise it (with a "
            f"RoPE scaling that fits)")
    args.seq_length = longest  # --seq-length is not used: the longest length is fed
    # Answer positions are picked from each rank's whole slice; sequence parallelism would split
    # it over TP. It changes memory only, not numbers, so evaluation runs without it.
    args.sequence_parallel = False
    args.recompute_granularity = None
    model, layout = arguments.model_and_layout(args, world_size)
    # Forward passes only: flex may run on CPU here. Checked before any process group exists.
    attention_backends.plan_attention(model, layout, on_cpu=arguments.device_is_cpu(args.device),
                                      training=False, seq_lengths=lengths)
    if not args.load:
        raise arguments.ArgumentError("--load CKPT is required: a checkpoint directory written "
                                      "by megatron_ext.train or tools/convert_checkpoint.py")
    integrity.find_checkpoint(args.load, required="evaluation")
    if not os.path.exists(args.tokenizer_model):
        raise arguments.ArgumentError(f"--tokenizer-model {args.tokenizer_model} does not exist")
    if not (os.path.isfile(args.eval_data) or os.path.isfile(args.eval_data + ".bin")):
        raise arguments.ArgumentError(f"--eval-data {args.eval_data}: no such jsonl file or "
                                      f"indexed-dataset prefix ({args.eval_data}.bin/.idx)")
    return model, layout, config


def progress_factory(enabled: bool):
    from tqdm import tqdm

    def make(description: str, total: int):
        bar = tqdm(total=total, desc=description, unit="seq", file=sys.stderr,
                   disable=not enabled or total == 0, dynamic_ncols=True)

        def update(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return update

    return make


def evaluate(args: argparse.Namespace, model_config: ModelConfig, layout: Layout,
             config: EvalConfig) -> int:
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megatron_ext import parallel
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.evaluate import results as results_mod
    from megatron_ext.evaluate.corpus import EvalCorpus
    from megatron_ext.evaluate.model_runner import ModelRunner, load_model
    from megatron_ext.evaluate.tasks import run_tasks

    start = time.perf_counter()
    _, plat = parallel.initialize(layout.tp, layout.pp, layout.cp, device=args.device,
                                  timeout_minutes=args.distributed_timeout_minutes)
    try:
        device = plat.device(torch.cuda.current_device() if not plat.is_cpu else 0)
        torch.manual_seed(args.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)  # the tracker attention needs
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        corpus = EvalCorpus(args.eval_data, tokenizer)
        model_config, model = load_model(args.load, model_config, layout, device, plat.is_cpu)
        runner = ModelRunner(model, device,
                             min(tokenizer.vocab_size, model_config.padded_vocab_size))
        rank0 = parallel.is_rank0()
        results = run_tasks(runner, corpus, tokenizer, config,
                            progress_factory(rank0 and not args.no_progress))
        ckpt_dir, iteration = checkpointing.checkpoint_dir_to_load(args.load)
        results["config"] = {
            "load": os.path.abspath(args.load), "checkpoint": os.path.abspath(ckpt_dir),
            "iteration": iteration, "eval_data": os.path.abspath(args.eval_data),
            "corpus": {"kind": corpus.kind, "documents": len(corpus),
                       "skipped_empty_rows": corpus.skipped_empty},
            "tokenizer": {"type": args.tokenizer_type, "model": args.tokenizer_model,
                          "vocab_size": tokenizer.vocab_size},
            "tasks": config.tasks, "lengths": config.lengths, "depths": config.depths,
            "num_samples": config.num_samples, "seed": config.seed,
            "bucket_size": config.bucket_size, "chat_template": config.chat_template,
            "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp,
                       "dp": parallel_state.get_data_parallel_world_size()},
            "device": plat.device_type,
            "dtype": model_config.dtype_name,
            "ran": attention_backends.what_ran(model, plat.device_type, layout.cp),
            # the architecture, lengths and RoPE scaling (YaRN / llama3) the logits came from
            "model": checkpointing.model_record(model_config),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if rank0:
            paths = results_mod.save(args.output, results)
            print(results_mod.summary(results, paths), flush=True)
    finally:
        parallel.destroy()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        vars(args).update(checkpoint_args.overrides(
            args, checkpoint_args.explicit_dests(parser, argv)))
        model_config, layout, config = finalize(args, launched_world_size())
    except UserError as err:
        parser.error(str(err))
    try:
        return evaluate(args, model_config, layout, config)
    except UserError as err:
        # Input problems found after start-up: one clear line per rank, not a traceback.
        return report(PROG, err)
