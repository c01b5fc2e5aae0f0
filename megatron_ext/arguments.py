"""Command-line arguments with Megatron-LM's flag names, and their validation.

Validation happens before anything is written or any process group is created, so bad input
fails fast with an error that names the flag and the fix (argparse's usual exit code 2).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence, Tuple

from megatron_ext import objectives
from megatron_ext.config import (ArgsProvider, CheckpointConfig, DataConfig, DistributedConfig,
                                 LoggingConfig, ModelConfig, RunConfig, TrainingConfig,
                                 section_from_namespace)
from megatron_ext.checkpoints import checkpoint_args
from megatron_ext.data import dataset_checks, position_schemes
from megatron_ext.data.blend import parse_data_path  # noqa: F401 (public: Megatron-LM's flag)
from megatron_ext.errors import ArgumentError, UserError
from megatron_ext.parallel.layout import Layout, launched_world_size
from megatron_ext.model import attention_backends
from megatron_ext.model.rope_scaling import RopeScaling
from megatron_ext.objectives import preference


# Megatron-LM's defaults, for every objective that does not bring its own.
PRETRAINING_OPTIMIZER_DEFAULTS = {"adam_beta2": 0.95, "weight_decay": 0.01}


def build_parser(prog: str = "megatron_ext.train",
                 providers: Sequence[ArgsProvider] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_parallel_args(p)
    add_training_args(p)
    add_data_args(p)
    add_checkpoint_args(p)
    add_logging_args(p)
    for provider in providers:  # features the entry point brings (e.g. tasks during training)
        provider.add_arguments(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (Llama family)")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="default: 4 * hidden size, or the Llama 8/3 rule rounded up to 64 with --swiglu")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted for Megatron-LM compatibility; GQA is on whenever "
                        "--num-query-groups is smaller than --num-attention-heads")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["rope", "yarn"], default="rope",
                   help="yarn: YaRN RoPE scaling (HF rope_type 'yarn'; the --yarn-*, "
                        "--rotary-scaling-factor and --mscale* flags below)")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama-3.x RoPE frequency scaling (HF llama3; low/high frequency factors "
                        "and original context default to Megatron-Core's 1, 4 and 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0,
                   help="factor for --use-rope-scaling")
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                   help="linear RoPE position interpolation (HF rope_type 'linear'): positions are "
                        "divided by this factor")
    # Llama-3 scaling's other parameters: Megatron-LM fixes them, so these three are ours.
    g.add_argument("--rope-scaling-low-freq-factor", type=float, default=1.0,
                   help="--use-rope-scaling's low_freq_factor (HF llama3; Megatron-LM fixes 1)")
    g.add_argument("--rope-scaling-high-freq-factor", type=float, default=4.0,
                   help="--use-rope-scaling's high_freq_factor (HF llama3; Megatron-LM fixes 4)")
    g.add_argument("--rope-scaling-original-max-position-embeddings", type=int, default=8192,
                   help="--use-rope-scaling's original context (HF llama3 "
                        "original_max_position_embeddings; Megatron-LM fixes 8192)")
    # YaRN: Megatron-LM's flag names (its GPT path reads them as config.yarn_*).
    g.add_argument("--rotary-scaling-factor", type=float, default=1.0,
                   help="YaRN scaling factor (HF factor) for --position-embedding-type yarn")
    g.add_argument("--yarn-original-max-position-embeddings", type=int, default=None,
                   help="YaRN: the context the model was trained for (HF "
                        "original_max_position_embeddings); required with yarn")
    g.add_argument("--yarn-beta-fast", type=float, default=32.0, help="YaRN beta_fast")
    g.add_argument("--yarn-beta-slow", type=float, default=1.0, help="YaRN beta_slow")
    g.add_argument("--mscale", type=float, default=1.0,
                   help="YaRN attention temperature: factor m(s, mscale) / m(s, mscale-all-dim), "
                        "m(s, x) = 0.1 x ln s + 1 (HF mscale; default 1 / 0 = HF's plain factor)")
    g.add_argument("--mscale-all-dim", type=float, default=0.0, help="YaRN mscale_all_dim")
    g.add_argument("--yarn-correction-range-round-to-int", action=argparse.BooleanOptionalAction,
                   default=True, help="round YaRN's ramp ends to whole dimensions (HF truncate)")
    g.add_argument("--yarn-attention-factor", type=float, default=None,
                   help="YaRN: multiply cos / sin by this instead of the mscale rule (HF "
                        "attention_factor; our flag, Megatron-LM has none)")
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate output layer (Llama); the default ties it to the embedding")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="accepted for Megatron-LM compatibility; linear biases are off by default")
    g.add_argument("--add-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true", help="QKV bias only (Qwen2)")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalise queries and keys per head (over --kv-channels) before RoPE, "
                        "with --normalization (Qwen3)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"],
                   default="auto", help="auto: Transformer Engine on GPU when importable")
    g.add_argument("--attention-backend", choices=list(attention_backends.BACKEND_CHOICES),
                   default="auto",
                   help="core attention, one semantics (causal by global index, documents, "
                        "shared-prefix branches) on three engines: 'flex' = FlexAttention under "
                        "torch.compile (fused, block-sparse; forward-only on CPU); 'blockwise' = "
                        "plain torch (CPU training, the reference; 'torch' is its former name); "
                        "'te' = Transformer Engine's DotProductAttention (plain causal only, its "
                        "own CP exchanges). auto = flex on CUDA, blockwise on CPU (never te)")
    g.add_argument("--attention-block-size", type=int, default=None,
                   help="blockwise backend: tokens per attention block (default: 1024, or one "
                        "context-parallel chunk, seq-length / (2 x CP), when smaller). Smaller "
                        "blocks hold smaller score tiles and skip more of what document / branch "
                        "masks hide")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--cp-comm-type", choices=list(attention_backends.CP_COMM_CHOICES),
                   default=None,
                   help="context-parallel exchange. --attention-backend te: Transformer Engine's "
                        "p2p (default), a2a, all_gather or a2a+p2p ('allgather' is read as "
                        "all_gather); flex and blockwise always all-gather keys and values")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None,
                   help="--cp-comm-type a2a+p2p: the a2a group size, then the p2p group size "
                        "(their product is --context-parallel-size)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available, else cpu (gloo)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch size x data-parallel size")
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop after this iteration (the schedule still spans --train-iters)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="sgd with --sgd-momentum 0, --weight-decay 0 and --clip-grad 0 makes an "
                        "update exactly -lr x gradient")
    g.add_argument("--sgd-momentum", type=float, default=0.9, help="momentum of --optimizer sgd")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: 0.01 (Megatron-LM's); preference runs: 0.05 (LOGO's recipe)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=None,
                   help="default: 0.95 (Megatron-LM's); preference runs: 0.999 (LOGO's recipe)")
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    # fp16 loss scaling (Megatron-LM's flags; bf16 needs none): a fixed --loss-scale, or a
    # dynamic one that starts at --initial-loss-scale, halves on an overflowing step (after
    # --hysteresis of them; the step is skipped) and doubles after --loss-scale-window clean ones.
    g.add_argument("--loss-scale", type=float, default=None,
                   help="fixed fp16 loss scale (default: dynamic loss scaling)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefixes of .bin/.idx files, optionally weighted: 0.7 pathA 0.3 pathB")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--data-cache-path", default=None,
                   help="where Megatron's sample indices are cached (default: next to --save)")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--packed-documents", action="store_true",
                   help="documents packed into a sequence attend only within themselves, position "
                        "ids restart per document and targets across a document end are masked "
                        "(Megatron's --reset-attention-mask also turns this on)")
    g.add_argument("--document-packing", choices=["stream", "whole"], default=None,
                   help="with packed documents: 'stream' cuts --seq-length windows from the "
                        "concatenated documents (Megatron's GPTDataset; a document may continue in "
                        "the next window), 'whole' places whole documents into windows (first "
                        "fit, padded; the build prints the packing efficiency). Default: whole "
                        "for --objective sft, else stream")
    g.add_argument("--overlong-documents", choices=["truncate", "error"], default="truncate",
                   help="--document-packing whole: a document longer than --seq-length keeps "
                        "its first --seq-length tokens (counted in the packing summary), or is "
                        "an error")
    g.add_argument("--position-scheme", choices=list(position_schemes.SCHEMES),
                   default="contiguous",
                   help="position ids of a sample: contiguous; pose (chunks shifted by random skip "
                        "biases); longrecipe (sentences contiguous, the unused positions of "
                        "--target-seq-length spread over the gaps between them); logo (preference "
                        "data: context chunks at random offsets in their own slots of the target "
                        "window, question and answers after them)")
    g.add_argument("--target-seq-length", type=int, default=None,
                   help="the context length T pose/longrecipe positions cover (default: "
                        "--max-position-embeddings); must exceed --seq-length for them")
    g.add_argument("--positions-across-documents", action="store_true",
                   help="pose/longrecipe without --packed-documents: spread one set of ids over "
                        "the whole --seq-length window even where it holds several unrelated "
                        "documents (position 0 may fall mid-document). Default: refused; use "
                        "--packed-documents, which gives every document its own ids over [0, T)")
    g.add_argument("--pose-num-chunks", type=int, default=2)
    g.add_argument("--longrecipe-contiguous-prefix", action="store_true",
                   help="keep a random contiguous prefix of up to half the sample at positions "
                        "0.. (the released LongRecipe code's anchor)")
    g.add_argument("--objective", choices=list(objectives.NAMES), default=None,
                   help="sft: loss on assistant tokens only (chat data from "
                        "tools/preprocess_data.py), packed with document masking; preference: "
                        "chosen vs rejected answers (data from tools/preprocess_preference.py). "
                        "Default: preference for preference data, else pretrain")
    preference.add_arguments(p)


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only; reset iteration, optimizer and data position")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="model flags from --load's model_args.json (architecture, lengths, RoPE "
                        "scaling); explicit architecture flags that contradict it are refused")
    g.add_argument("--keep-last-n-checkpoints", type=int, default=None,
                   help="after each successful save, delete older iter_* directories beyond the "
                        "newest N (never the one the tracker file names)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoint shards from a forked process per rank while training "
                        "continues; the checkpoint is renamed into place and the tracker updated "
                        "once every rank's writer has finished (same atomicity as a normal save)")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load: stop with an error when it holds no checkpoint (default: "
                        "a warning, and the run starts from random weights)")


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None,
                   help="one JSON object per iteration (and per evaluation)")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=0)
    g.add_argument("--skip-train", action="store_true",
                   help="no training: evaluate --eval-iters batches of the validation split and "
                        "exit (e.g. a checkpoint at a longer --seq-length)")


def finalize(args: argparse.Namespace, world_size: int,
             providers: Sequence[ArgsProvider] = ()) -> RunConfig:
    """Fill derived defaults, validate, and freeze: the one place configuration is decided.

    Raises ArgumentError naming the offending flag. ``providers``: the features whose flags
    ``build_parser`` added; each turns the namespace into its own section of ``cfg.extras``.
    """
    check_load(args)
    model, layout = model_and_layout(args, world_size)
    check_loss_scaling(args)  # training's optimizer flags (evaluation has none)
    _resolve_objective(args)  # an objective may set its own optimiser defaults first
    _refuse_flags_that_cannot_apply(args)
    for field, value in PRETRAINING_OPTIMIZER_DEFAULTS.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    _validate_position_args(args)

    dp = layout.dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ArgumentError(
            f"--global-batch-size ({args.global_batch_size}) must be divisible by "
            f"--micro-batch-size ({args.micro_batch_size}) x data-parallel size ({dp})")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = max(1, args.train_iters)
    if args.lr_warmup_iters > 0 and args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than "
                            f"--lr-decay-iters (default --train-iters; here {args.lr_decay_iters})")

    _validate_data_args(args)
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.keep_last_n_checkpoints is not None and (args.keep_last_n_checkpoints < 1
                                                     or args.save is None):
        raise ArgumentError(f"--keep-last-n-checkpoints {args.keep_last_n_checkpoints}: give N >= 1 "
                            "together with --save DIR")
    if args.async_save and args.save is None:
        raise ArgumentError("--async-save needs --save DIR")
    if args.eval_interval and args.eval_iters <= 0:
        raise ArgumentError("--eval-interval needs --eval-iters > 0")
    if args.skip_train and args.eval_iters <= 0:
        raise ArgumentError("--skip-train evaluates the validation split: give --eval-iters > 0")

    cfg = RunConfig(
        model=model, layout=layout,
        distributed=section_from_namespace(DistributedConfig, args),
        data=section_from_namespace(DataConfig, args, data_path=tuple(args.data_path)),
        training=section_from_namespace(TrainingConfig, args),
        checkpoint=section_from_namespace(CheckpointConfig, args),
        logging=section_from_namespace(LoggingConfig, args),
        objective=objectives.get(args.objective).config(args),
        extras={provider.name: provider.section(args) for provider in providers},
    )
    # Checked now, before any process group, data or model exists; the builder plans again with
    # the platform it really runs on and gets the same answer.
    attention_backends.plan_attention(cfg.model, cfg.layout, on_cpu=device_is_cpu(args.device),
                                      training=not args.skip_train,
                                      document_masks=cfg.document_masking_source)
    return cfg


def check_load(args: argparse.Namespace) -> None:
    """The checkpoint --load names is whole, or absent with a warning (an error with --finetune
    or --exit-on-missing-checkpoint); checked before anything is built."""
    from megatron_ext.checkpoints import integrity

    if args.load is None:
        if args.exit_on_missing_checkpoint:
            raise ArgumentError("--exit-on-missing-checkpoint needs --load DIR")
        return
    required = ("--finetune" if args.finetune else
                "--exit-on-missing-checkpoint" if args.exit_on_missing_checkpoint else None)
    integrity.find_checkpoint(args.load, required)


def model_and_layout(args: argparse.Namespace, world_size: int) -> Tuple[ModelConfig, Layout]:
    """The model and its layout from the model and parallelism flags, derived defaults filled and
    Megatron's rules checked; training and evaluation both build their model config here."""
    layout = Layout.from_args(args, world_size)
    derive_model_defaults(args)
    layout.check_model(heads=args.num_attention_heads, groups=args.num_query_groups,
                       ffn=args.ffn_hidden_size, layers=args.num_layers)
    layout.check_sequence(args.seq_length)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings "
                            f"({args.max_position_embeddings})")
    if args.attention_block_size is not None and args.attention_block_size < 1:
        raise ArgumentError(f"--attention-block-size must be >= 1, got {args.attention_block_size}")
    if args.bf16 and args.fp16:
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive")
    try:  # RoPE scaling flags that contradict each other or would be ignored
        RopeScaling.from_model_fields(args)
    except UserError as err:
        raise ArgumentError(str(err)) from None
    return section_from_namespace(ModelConfig, args), layout


def check_loss_scaling(args: argparse.Namespace) -> None:
    """Loss-scale values a dynamic scaler can work with (Megatron-Core asserts, later)."""
    for flag, value in (("--initial-loss-scale", args.initial_loss_scale),
                        ("--min-loss-scale", args.min_loss_scale),
                        ("--loss-scale-window", args.loss_scale_window),
                        ("--hysteresis", args.hysteresis)):
        if value is None or value <= 0:
            raise ArgumentError(f"{flag} must be > 0, got {value}")
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise ArgumentError(f"--loss-scale must be > 0, got {args.loss_scale} (leave it out for "
                            "dynamic loss scaling)")
    if args.min_loss_scale > args.initial_loss_scale:
        raise ArgumentError(f"--min-loss-scale ({args.min_loss_scale}) exceeds "
                            f"--initial-loss-scale ({args.initial_loss_scale})")


def derive_model_defaults(args: argparse.Namespace) -> None:
    """Fill the model dimensions Megatron-LM derives when they are not given."""
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.kv_channels is None:
        if args.hidden_size % args.num_attention_heads != 0:
            raise ArgumentError(
                f"--hidden-size ({args.hidden_size}) is not divisible by --num-attention-heads "
                f"({args.num_attention_heads}); pass --kv-channels explicitly")
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.ffn_hidden_size is None:
        if args.swiglu:
            args.ffn_hidden_size = ((int(8 * args.hidden_size / 3) + 63) // 64) * 64
        else:
            args.ffn_hidden_size = 4 * args.hidden_size


def device_is_cpu(device: Optional[str]) -> bool:
    """Whether this run will be on CPU (``--device``, ``MEGATRON_EXT_DEVICE``, else CUDA if any)."""
    from megatron_ext.parallel import device_platform

    try:
        return device_platform.detect(device).is_cpu
    except (RuntimeError, ValueError) as err:
        raise ArgumentError(str(err)) from None


def _data_kinds(args: argparse.Namespace) -> set:
    from megatron_ext.data import token_flags

    prefixes = parse_data_path(args.data_path)[0] if args.data_path else []
    return {(token_flags.read_meta(prefix) or {}).get("kind", "text") for prefix in prefixes}


def _resolve_objective(args: argparse.Namespace) -> None:
    """The objective follows the data's recorded kind; the objective then checks its own flags."""
    kinds = _data_kinds(args)
    if "preference" in kinds:
        if kinds != {"preference"}:
            raise ArgumentError("--data-path mixes preference data with other kinds; a run trains "
                                "one objective")
        if args.objective not in (None, "preference"):
            raise ArgumentError(f"--objective {args.objective}: --data-path holds preference data "
                                "(tools/preprocess_preference.py); drop --objective")
        args.objective = "preference"
    elif args.objective == "preference":
        raise ArgumentError("--objective preference needs --data-path written by "
                            "tools/preprocess_preference.py")
    args.objective = args.objective or "pretrain"
    objectives.get(args.objective).validate(args)


def _validate_position_args(args: argparse.Namespace) -> None:
    if args.target_seq_length is None:
        args.target_seq_length = args.max_position_embeddings
    if args.target_seq_length < args.seq_length:
        raise ArgumentError(f"--target-seq-length ({args.target_seq_length}) must be >= "
                            f"--seq-length ({args.seq_length})")
    if args.target_seq_length > args.max_position_embeddings:
        raise ArgumentError(
            f"--target-seq-length ({args.target_seq_length}) exceeds --max-position-embeddings "
            f"({args.max_position_embeddings}); raise --max-position-embeddings to the target")
    skip_wise = args.position_scheme in position_schemes.SKIP_WISE
    if skip_wise and args.target_seq_length <= args.seq_length:
        raise ArgumentError(
            f"--position-scheme {args.position_scheme} spreads a sample's ids over "
            f"--target-seq-length T = {args.target_seq_length}, which is not longer than "
            f"--seq-length {args.seq_length}: the ids would be plain 0..n-1. Set "
            f"--target-seq-length (and --max-position-embeddings) to the context you extend to")
    if skip_wise and not args.packed_documents and not args.positions_across_documents:
        raise ArgumentError(
            f"--position-scheme {args.position_scheme} draws one document's ids over [0, T); "
            "--seq-length windows of a token stream hold pieces of several documents. Add "
            "--packed-documents (every document, or window piece of one, gets its own ids and "
            "attends only to itself), or --positions-across-documents to spread one set of ids "
            "over the whole window anyway")
    if args.positions_across_documents and (not skip_wise or args.packed_documents):
        raise ArgumentError("--positions-across-documents applies to --position-scheme "
                            "pose/longrecipe without --packed-documents (or --objective sft); "
                            "drop it")
    if args.position_scheme == "pose" and not 1 <= args.pose_num_chunks <= args.seq_length:
        raise ArgumentError(f"--pose-num-chunks must be between 1 and --seq-length, got "
                            f"{args.pose_num_chunks}")


def _validate_data_args(args: argparse.Namespace) -> None:
    if not args.data_path:
        raise ArgumentError("--data-path is required: one or more prefixes written by "
                            "tools/preprocess_data.py (optionally weighted: 0.7 pathA 0.3 pathB)")
    args.data_blend = parse_data_path(args.data_path)
    for prefix in args.data_blend[0]:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ArgumentError(f"--data-path: {prefix + ext} does not exist; run "
                                    f"tools/preprocess_data.py --output-prefix ... first")
    if args.tokenizer_type is None or args.tokenizer_model is None:
        raise ArgumentError("--tokenizer-type and --tokenizer-model are required")
    if not os.path.exists(args.tokenizer_model):
        raise ArgumentError(f"--tokenizer-model: {args.tokenizer_model} does not exist")
    for prefix in args.data_blend[0]:
        dataset_checks.check_prefix(prefix, args.tokenizer_type, args.tokenizer_model)


# Flags only one objective or position scheme reads: given elsewhere they would silently do nothing.
PREFERENCE_FLAGS = ("preference_loss", "beta", "gamma", "gamma_beta_ratio", "sft_weight",
                    "num_rejected", "preference_packing", "reference_logps",
                    "dpo_label_smoothing")
SCHEME_FLAGS = {"pose_num_chunks": "pose", "longrecipe_contiguous_prefix": "longrecipe"}


def _refuse_flags_that_cannot_apply(args: argparse.Namespace) -> None:
    defaults = argparse.ArgumentParser()
    add_data_args(defaults)
    given = [dest for dest in PREFERENCE_FLAGS if getattr(args, dest) != defaults.get_default(dest)]
    if given and args.objective != "preference":
        flags = " ".join("--" + dest.replace("_", "-") for dest in given)
        raise ArgumentError(f"{flags}: preference-loss flags, but --data-path holds "
                            f"{args.objective} data (not tools/preprocess_preference.py output); "
                            f"drop {flags} or train on preference data")
    for dest, scheme in SCHEME_FLAGS.items():
        if getattr(args, dest) != defaults.get_default(dest) and args.position_scheme != scheme:
            flag = "--" + dest.replace("_", "-")
            raise ArgumentError(f"{flag} is read by --position-scheme {scheme} only (this run: "
                                f"{args.position_scheme}); drop {flag} or use --position-scheme "
                                f"{scheme}")


def parse(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
          providers: Sequence[ArgsProvider] = ()) -> RunConfig:
    """Parse, validate and freeze; exits with status 2 and a one-line error on bad input."""
    parser = build_parser(providers=providers)
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = launched_world_size()
    try:
        vars(args).update(checkpoint_args.overrides(
            args, checkpoint_args.explicit_dests(parser, argv)))
        return finalize(args, world_size, providers)
    except UserError as err:  # bad flags, data or checkpoint files
        parser.error(str(err))
