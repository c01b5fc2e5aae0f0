"""Layout-invariant initialisation: initial weights depend on the seed and the architecture only.

Megatron-Core draws every parameter from the global RNG in construction order, so the same seed
gives a different model under pipeline parallelism (a stage builds only its own layers) and the
draws of tensor-parallel pieces depend on TP. Here, after the model is built, every parameter is
drawn again:

* one ``torch.Generator`` (CPU, so CPUs and GPUs agree) per parameter, seeded by the run's seed and
  the parameter's GLOBAL name in the sharded state dict (``decoder.layers.<global layer>...``: layer
  numbers already offset by the pipeline stage; a tied output layer maps to the embedding's name);
* it draws the whole TP=1 tensor with Megatron-Core's rule for that parameter (``initial_values``);
* and this rank keeps the slice the sharded state dict says its local shard is in the global
  tensor: rows for column-parallel and vocab-parallel layers, columns for row-parallel ones, the
  gate and up halves of SwiGLU's ``linear_fc1`` separately (a rank holds [gate_r; up_r]), QKV rows
  already grouped per query group.

So a layout's shard is exactly the piece of the single-process tensor a checkpoint would map it to,
and TP/PP/CP/DP or construction order change nothing. Replicas (DP, CP, a tied output layer on the
last stage) draw the same values because they share the name.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from typing import Dict, List, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer import TransformerConfig

# Megatron-Core's output projections: output_layer_init_method, N(0, std / sqrt(2 * num_layers)).
OUTPUT_PROJECTIONS = (".linear_proj.", ".linear_fc2.")


def generator_for(seed: int, name: str) -> torch.Generator:
    """A generator that depends on (seed, name) only: no process, order or platform state."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def global_name(sh: ShardedTensor) -> str:
    """The shard's tensor in the single-process model: its key, and for stacked layers (axes
    prepended to the local tensor, e.g. ``decoder.layers.mlp.linear_fc1.weight`` with the global
    layer number on axis 0) its offsets on those axes."""
    lead = sh.prepend_axis_num
    return sh.key if not lead else f"{sh.key}@{tuple(sh.global_offset[:lead])}"


def local_index(sh: ShardedTensor) -> tuple:
    """Where the shard sits in its global tensor (the prepended axes left out)."""
    lead = sh.prepend_axis_num
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset[lead:], sh.local_shape))


def initial_values(name: str, shape, config: TransformerConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """The full (TP=1) fp32 initial tensor of the parameter whose checkpoint key is ``name``.

    Megatron-Core 0.16.1's rules: biases zeros (``_initialize_affine_weight_*`` leaves them zero),
    norm weights ones (1-D weights: RMSNorm/LayerNorm scales), word embeddings
    ``embedding_init_method`` (N(0, embedding_init_method_std)), output projections
    ``output_layer_init_method``, every other matrix ``init_method`` (N(0, init_method_std)).
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.endswith("_bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    if "word_embeddings" in name:
        std = config.embedding_init_method_std
    elif any(part in f".{name}" for part in OUTPUT_PROJECTIONS):
        std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    else:
        std = config.init_method_std
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def sharded_tensors(module: torch.nn.Module) -> List[ShardedTensor]:
    """The module's parameter shards with their place in the global tensors (factories built)."""
    shards = []
    for item in module.sharded_state_dict().values():
        if isinstance(item, ShardedTensorFactory):
            shards.extend(item.build())
        elif isinstance(item, ShardedTensor):
            shards.append(item)
    return shards


def parameter_shards(module: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter, int,
                                                         ShardedTensor]]:
    """(parameter name, parameter, element offset of the shard in it, shard) for every shard that
    is (a contiguous block of) a parameter. Found by address, since parameters may be views of one
    buffer (DDP with the distributed optimizer)."""
    spans = sorted((p.data_ptr(), name, p) for name, p in module.named_parameters())
    starts = [start for start, _, _ in spans]
    found = []
    for sh in sharded_tensors(module):
        if sh.data is None:
            continue
        at = bisect.bisect_right(starts, sh.data.data_ptr()) - 1
        if at < 0:
            continue
        start, name, param = spans[at]
        offset = (sh.data.data_ptr() - start) // param.element_size()
        if offset + sh.data.numel() <= param.numel() and param.dtype == sh.data.dtype:
            found.append((name, param, offset, sh))
    return found


@torch.no_grad()
def initialize_layout_invariant(module: torch.nn.Module, config: TransformerConfig,
                                seed: int) -> None:
    """Re-draw every parameter of ``module`` (one rank's model chunk) by the rule above."""
    written: Dict[str, int] = {name: 0 for name, _ in module.named_parameters()}
    shards = parameter_shards(module)
    # Shards of one global tensor (SwiGLU's two halves) share the draw: grouped by name.
    shards.sort(key=lambda found: global_name(found[3]))
    drawn, full = None, None
    for name, _, _, sh in shards:
        if global_name(sh) != drawn:
            drawn = global_name(sh)
            full = initial_values(sh.key, sh.global_shape[sh.prepend_axis_num:], config,
                                  generator_for(seed, drawn))
        piece = full[local_index(sh)]
        sh.data.copy_(piece.to(sh.data.dtype))
        written[name] += sh.data.numel()
    missed = [name for name, p in module.named_parameters() if written[name] != p.numel()]
    if missed:
        # A parameter without (or with overlapping) shards would keep Megatron's draw and break
        # the rule silently: a bug in this module for a new parameter kind.
        raise RuntimeError(f"layout-invariant init does not cover {missed}")
