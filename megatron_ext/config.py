"""The run's configuration: typed, frozen, built once where the flags are read.

``arguments.parse`` reads Megatron-LM-named flags, fills derived defaults, validates, and returns a
``RunConfig``; from then on nothing changes configuration (the dataclasses are frozen). A value
computed later from something only known at run time (the embedding rows, from the tokenizer or
a checkpoint) makes a new config with ``dataclasses.replace``, never an edit in place.

    RunConfig
      model        ModelConfig       shapes, RoPE, numerics, attention engine (-> TransformerConfig)
      layout       Layout            TP x PP x CP x DP and every rule that ties them to the model
      distributed  DistributedConfig device and process-group timeout
      data         DataConfig        tokens on disk, tokenizer, packing, position scheme
      training     TrainingConfig    batch, schedule, optimiser, iterations
      checkpoint   CheckpointConfig  --save / --load and what a load restores
      logging      LoggingConfig     log lines, TensorBoard, JSONL metrics
      objective    ObjectiveConfig   which objective, and its own options (e.g. PreferenceOptions)
      extras       {name: section}   sections of features that add flags through a provider
                                     (e.g. "eval_tasks": long-context tasks during training)

Each section's field names are the flags' ``dest`` names, so ``--hidden-size`` is
``cfg.model.hidden_size``; ``tests/test_config.py`` checks that every flag lands in exactly one
section and that the defaults here are the parser's. Tools that build a model without flags (the
checkpoint converter, merging, evaluation) make a ``ModelConfig`` directly.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple, Type, TypeVar

from megatron_ext.parallel.layout import Layout

T = TypeVar("T")


def section_from_namespace(cls: Type[T], namespace: argparse.Namespace, **overrides) -> T:
    """``cls`` filled from the namespace attributes of the same names (``overrides`` win)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if f.init and f.name not in overrides and hasattr(namespace, f.name)}
    return cls(**values, **overrides)


# Fields that fix parameter shapes and numerics; a checkpoint and a run must agree on them.
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "norm_epsilon", "swiglu", "untie_embeddings_and_output_weights",
    "add_bias_linear", "add_qkv_bias", "rotary_base", "padded_vocab_size",
    "qk_layernorm",
)
# Of those, the ones a context-extension run changes on purpose when it starts from weights
# (--finetune): a larger static RoPE base for a longer target window.
EXTENSION_FIELDS = ("rotary_base",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family GPT: what fixes its parameters and numerics, and how attention runs."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    max_position_embeddings: int
    seq_length: int  # the length this run feeds the model (evaluation: its longest)
    rotary_base: float = 10000.0
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rotary_seq_len_interpolation_factor: Optional[float] = None
    # Llama-3 scaling beyond Megatron-LM's fixed 1 / 4 / 8192 (our flags; model/rope_scaling.py).
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    # YaRN (--position-embedding-type yarn): Megatron-LM's flags, plus HF's attention_factor.
    position_embedding_type: str = "rope"
    rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True
    yarn_attention_factor: Optional[float] = None
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    make_vocab_size_divisible_by: int = 128
    # Embedding rows: the tokenizer's vocabulary padded (training), or a checkpoint's record.
    padded_vocab_size: Optional[int] = None
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bf16: bool = False
    fp16: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    transformer_impl: str = "auto"
    attention_backend: str = "auto"
    attention_block_size: Optional[int] = None
    # Accepted for Megatron-LM command lines; they select nothing of their own.
    group_query_attention: bool = False
    disable_bias_linear: bool = False

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def with_vocab(self, padded_vocab_size: int) -> "ModelConfig":
        return dataclasses.replace(self, padded_vocab_size=int(padded_vocab_size))


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    device: Optional[str] = None  # None: cuda when available, else cpu (gloo)
    distributed_timeout_minutes: int = 30


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_path: Tuple[str, ...]
    data_blend: Tuple[list, Optional[list]]  # (prefixes, weights or None): Megatron's blend
    tokenizer_type: str
    tokenizer_model: str
    split: str = "969,30,1"
    data_cache_path: Optional[str] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    packed_documents: bool = False
    position_scheme: str = "contiguous"
    target_seq_length: Optional[int] = None
    pose_num_chunks: int = 2
    longrecipe_contiguous_prefix: bool = False
    positions_across_documents: bool = False
    document_packing: Optional[str] = None  # stream | whole (resolved by the objective)
    overlong_documents: str = "truncate"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    train_iters: int
    lr_decay_iters: int
    exit_interval: Optional[int] = None
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    optimizer: str = "adam"
    sgd_momentum: float = 0.9
    weight_decay: Optional[float] = None  # filled per objective by arguments.finalize
    adam_beta1: float = 0.9
    adam_beta2: Optional[float] = None  # filled per objective by arguments.finalize
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    loss_scale: Optional[float] = None  # fp16: fixed scale; None: dynamic
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2
    use_distributed_optimizer: bool = False
    eval_interval: Optional[int] = None
    eval_iters: int = 0
    skip_train: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    exit_on_missing_checkpoint: bool = False
    use_checkpoint_args: bool = False
    keep_last_n_checkpoints: Optional[int] = None
    async_save: bool = False


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    metrics_jsonl: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    name: str  # pretrain | sft | preference
    options: Any = None  # the objective's own frozen options (preference: PreferenceOptions)


@dataclasses.dataclass(frozen=True)
class ArgsProvider:
    """A feature's flags for the trainer (Megatron-LM's ``extra_args_provider``): it adds them to
    the parser and turns the parsed namespace into its own frozen section, ``cfg.extras[name]``.
    The trainer passes providers in, so the core never imports a feature."""

    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    section: Callable[[argparse.Namespace], Any]


def document_masking_source(objective: str, packed_documents: bool) -> Optional[str]:
    """What asks for document / branch masks (named for messages), or None for plain causal."""
    if objective == "preference":
        return "preference data"
    if objective == "sft":
        return "--objective sft"
    if packed_documents:
        return "--packed-documents / --reset-attention-mask"
    return None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    layout: Layout
    distributed: DistributedConfig
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    objective: ObjectiveConfig
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def document_masking_source(self) -> Optional[str]:
        """The flag or data that asks for document masks (for messages), or None."""
        return document_masking_source(self.objective.name, self.data.packed_documents
                                       or self.data.reset_attention_mask)

    def with_vocab(self, padded_vocab_size: int) -> "RunConfig":
        return dataclasses.replace(self, model=self.model.with_vocab(padded_vocab_size))
