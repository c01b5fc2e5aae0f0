"""A Llama-family Megatron-Core GPTModel: RMSNorm, SwiGLU, RoPE, GQA, optional QKV bias (Qwen2)
and optional per-head query/key norms (Qwen3's, Megatron-Core's ``qk_layernorm``).

Layer spec: Transformer Engine's on a GPU when TE works (fused linear + norm kernels),
Megatron-Core's local spec otherwise (CPU, or GPUs without TE). Both build the same parameters, so
checkpoints move between them. Core attention is chosen separately (``attention_backends``):
flex, blockwise or TE's own, plugged into either spec's ``core_attention`` submodule.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlock,
                                                         TransformerBlockSubmodules,
                                                         get_num_layers_to_build)

from megatron_ext.config import ModelConfig
from megatron_ext.parallel.layout import Layout
from megatron_ext.model.attention_backends import (
    CP_COMM_ALIASES,
    TE_SPEC,
    AttentionPlan,
    plan_attention,
)
from megatron_ext.model.cp_attention import TorchContextParallelAttention
from megatron_ext.model.flex_attention import FlexContextParallelAttention
from megatron_ext.model.init import initialize_layout_invariant
from megatron_ext.model.rope_scaling import RopeScaling
from megatron_ext.model.rotary import PositionIdsGPTModel
from megatron_ext.model.torch_norm import SequenceParallelTorchNorm


def params_dtype(model: ModelConfig) -> torch.dtype:
    if model.bf16:
        return torch.bfloat16
    if model.fp16:
        return torch.float16
    return torch.float32


def transformer_config(model: ModelConfig, layout: Layout, on_cpu: bool) -> TransformerConfig:
    dtype = params_dtype(model)
    full_recompute = model.recompute_granularity == "full"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias or model.add_bias_linear,
        # Also tells finalize_model_grads to sum the q/k norm weights' gradients over TP: each
        # rank normalises only its own heads with the (replicated) weight.
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model.bf16,
        fp16=model.fp16,
        # TE's name (Megatron-LM's "allgather" spelling translated); our backends all-gather.
        cp_comm_type=CP_COMM_ALIASES.get(layout.cp_comm_type, layout.cp_comm_type) or "p2p",
        # Initialise full weights on CPU and slice them, so TP ranks hold pieces of one model.
        use_cpu_initialization=True,
        perform_initialization=True,
        # Token-averaged loss over the global batch (finalize_model_grads divides by the token
        # count all-reduced over DP x CP), so any layout computes the same loss.
        calculate_per_token_loss=True,
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method if full_recompute else None,
        recompute_num_layers=model.recompute_num_layers if full_recompute else None,
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


def layer_spec(model: ModelConfig, layout: Layout, on_cpu: bool,
               plan: Optional[AttentionPlan] = None) -> ModuleSpec:
    """The decoder layer spec for ``plan`` (default: planned here, forward-only on CPU)."""
    plan = plan or plan_attention(model, layout, on_cpu, training=False)
    if plan.layer_spec == TE_SPEC:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(normalization=model.normalization,
                                        qk_layernorm=model.qk_layernorm)
        if layout.sequence_parallel:
            spec.submodules.input_layernorm = SequenceParallelTorchNorm
            spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    attention = spec.submodules.self_attention.submodules
    if model.qk_layernorm and layout.sequence_parallel and plan.layer_spec != TE_SPEC:
        # Megatron's torch norm refuses sequence parallelism. Queries and keys are whole
        # sequences by then (split by heads, not tokens), and the TP gradient sum this norm marks
        # its weights for is the one q/k norms need anyway (finalize_model_grads sums once).
        attention.q_layernorm = SequenceParallelTorchNorm
        attention.k_layernorm = SequenceParallelTorchNorm
    if plan.backend == "blockwise":
        attention.core_attention = ModuleSpec(module=TorchContextParallelAttention,
                                              params={"max_block_size": plan.block_size})
    elif plan.backend == "flex":
        attention.core_attention = ModuleSpec(module=FlexContextParallelAttention)
    else:  # te: TE's own, behind a guard that refuses document masks it would drop
        from megatron_ext.model.te_attention import guarded_te_attention

        attention.core_attention = ModuleSpec(module=guarded_te_attention())
    return spec


def build_model(model: ModelConfig, layout: Layout, config: TransformerConfig, on_cpu: bool,
                plan: Optional[AttentionPlan] = None, init_seed: Optional[int] = None) -> GPTModel:
    """This rank's stage of the model (first/last stages own embedding/output layer), with
    ``model.padded_vocab_size`` embedding rows.

    RoPE angles come from the batch's position ids (PoSE/LongRecipe/packed documents need that;
    the stock GPTModel assumes 0..s-1). With ``init_seed`` (training), the weights are drawn again
    by ``init.initialize_layout_invariant``: the same for every TP/PP/CP/DP layout. Without it
    (a checkpoint overwrites them anyway) Megatron-Core's construction-order draws stay.
    """
    if model.padded_vocab_size is None:
        raise ValueError("ModelConfig.padded_vocab_size is not set: use with_vocab() with the "
                         "tokenizer's padded size or the checkpoint's record first")
    spec = layer_spec(model, layout, on_cpu, plan)
    if layout.sequence_parallel and spec.submodules.input_layernorm is SequenceParallelTorchNorm:
        # The final norm comes from the block spec: the same sequence-parallel torch norm.
        spec = ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config),
            layer_norm=SequenceParallelTorchNorm))
    module = PositionIdsGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        rotary_percent=1.0,
        rope_scaling=model.use_rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        seq_len_interpolation_factor=model.rotary_seq_len_interpolation_factor,
        # Every RoPE scaling the flags describe (llama3 with any parameters, yarn), not only the
        # ones GPTModel's arguments above can say.
        rope_scaling_config=RopeScaling.from_model_fields(model),
    )
    if init_seed is not None:
        initialize_layout_invariant(module, config, init_seed)
    return module
