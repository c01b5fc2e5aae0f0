"""Run by tests/test_attention_backends.py in a fresh process: one rank, a tiny real model.

A checkpoint written by a model whose core attention keeps no extra state (the local spec) must
load into one whose core attention does (Transformer Engine's keeps FP8 metadata as
``_extra_state``): those entries start from their defaults. A checkpoint missing a real weight
must still be refused.
"""

import json
import sys

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext import arguments, parallel
from megatron_ext.checkpoints import checkpointing
from megatron_ext.model import builder
from megatron_ext.model.cp_attention import TorchContextParallelAttention


class AttentionWithExtraState(TorchContextParallelAttention):
    """Stands in for TE's core attention: same math, plus an ``_extra_state`` entry."""

    restored = []

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        AttentionWithExtraState.restored.append(state)


def tiny_model():
    args = arguments.build_parser().parse_args([
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "64", "--device", "cpu"])
    model, layout = arguments.model_and_layout(args, world_size=1)
    return model.with_vocab(256), layout


def build(model_layout, core_attention=None):
    model, layout = model_layout
    spec = builder.layer_spec(model, layout, on_cpu=True)
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=core_attention)
    return builder.PositionIdsGPTModel(
        config=builder.transformer_config(model, layout, on_cpu=True), transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size, max_sequence_length=64, pre_process=True,
        post_process=True, position_embedding_type="rope")


def main(save_dir: str) -> None:
    parallel.initialize(device="cpu")
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model_layout = tiny_model()
    local = build(model_layout)
    checkpointing.save(save_dir, 1, [local], None, None, 0, model_layout[0])

    torch.manual_seed(1)
    with_extra = build(model_layout, AttentionWithExtraState)
    assert any(k.endswith("core_attention._extra_state") for k in with_extra.state_dict())
    checkpointing.load(save_dir, [with_extra], None, None, model_layout[0])
    loaded = with_extra.state_dict()
    weights = {k: v for k, v in local.state_dict().items()
               if isinstance(v, torch.Tensor) and v.dtype.is_floating_point}
    same = bool(weights) and all(torch.equal(v, loaded[k]) for k, v in weights.items())

    # A real weight missing from the checkpoint is still an error.
    state = {k: v for k, v in local.state_dict().items() if "linear_proj.weight" not in k}
    try:
        checkpointing.load_model_state(local, state, set(), save_dir)
        refused = False
    except checkpointing.CheckpointError as err:
        refused = "linear_proj.weight" in str(err)
    print(json.dumps({"weights_equal": same, "missing_weight_refused": refused,
                      "extra_states_restored": len(AttentionWithExtraState.restored)}))
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
