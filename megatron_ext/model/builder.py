"""A Llama-family Megatron-Core GPTModel: RMSNorm, SwiGLU, RoPE, GQA, optional QKV bias (Qwen2).

Layer spec: Transformer Engine's on a GPU when TE works (fused linear + norm kernels),
Megatron-Core's local spec otherwise (CPU, or GPUs without TE). Both build the same parameters, so
checkpoints move between them. Core attention is chosen separately (``attention_backends``):
flex, blockwise or TE's own, plugged into either spec's ``core_attention`` submodule.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.model.attention_backends import (
    CP_COMM_ALIASES,
    TE_SPEC,
    AttentionPlan,
    plan_attention,
)
from megatron_ext.model.cp_attention import TorchContextParallelAttention
from megatron_ext.model.flex_attention import FlexContextParallelAttention
from megatron_ext.model.rotary import PositionIdsGPTModel


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def transformer_config(args: argparse.Namespace, on_cpu: bool) -> TransformerConfig:
    dtype = params_dtype(args)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias or args.add_bias_linear,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        # TE's name (Megatron-LM's "allgather" spelling translated); our backends all-gather.
        cp_comm_type=CP_COMM_ALIASES.get(args.cp_comm_type, args.cp_comm_type) or "p2p",
        # Initialise full weights on CPU and slice them, so TP ranks hold pieces of one model.
        use_cpu_initialization=True,
        perform_initialization=True,
        # Token-averaged loss over the global batch (finalize_model_grads divides by the token
        # count all-reduced over DP x CP), so any layout computes the same loss.
        calculate_per_token_loss=True,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
        # The fused kernels below are CUDA-only; TE's own fusions apply on GPU regardless.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        # Apex's persistent LayerNorm kernel. The local spec's torch norms assert it is off, and
        # TE's norms do not read it: on, every local-spec GPU run failed at start-up.
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(args: argparse.Namespace, on_cpu: bool,
               plan: Optional[AttentionPlan] = None) -> ModuleSpec:
    """The decoder layer spec for ``plan`` (default: planned here, forward-only on CPU)."""
    plan = plan or plan_attention(args, on_cpu, training=False)
    if plan.layer_spec == TE_SPEC:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=args.normalization)
    attention = spec.submodules.self_attention.submodules
    if plan.backend == "blockwise":
        attention.core_attention = ModuleSpec(module=TorchContextParallelAttention,
                                              params={"max_block_size": plan.block_size})
    elif plan.backend == "flex":
        attention.core_attention = ModuleSpec(module=FlexContextParallelAttention)
    else:  # te: TE's own, behind a guard that refuses document masks it would drop
        from megatron_ext.model.te_attention import guarded_te_attention

        attention.core_attention = ModuleSpec(module=guarded_te_attention())
    return spec


def build_model(args: argparse.Namespace, config: TransformerConfig, on_cpu: bool,
                vocab_size: int, plan: Optional[AttentionPlan] = None) -> GPTModel:
    """This rank's stage of the model (first/last stages own embedding/output layer).

    RoPE angles come from the batch's position ids (PoSE/LongRecipe/packed documents need that;
    the stock GPTModel assumes 0..s-1).
    """
    return PositionIdsGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args, on_cpu, plan),
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=args.rotary_base,
        rotary_percent=1.0,
        rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        seq_len_interpolation_factor=getattr(args, "rotary_seq_len_interpolation_factor", None),
    )
