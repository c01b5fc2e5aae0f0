"""Megatron-Core torch_dist checkpoints for the converter: stream a 'release' out, read by layer.

Writing: the model is built on the meta device (no memory), so its ``sharded_state_dict()`` gives
exactly the keys, global shapes and objects ``megatron_ext.train --load`` will ask for. Megatron's
``dist_checkpointing.save`` then runs with a sharded strategy whose planner produces each tensor
only when the writer asks for it (``materialize(key, offset, sizes)``) and drops it once written,
so conversion holds one tensor group at a time instead of the whole model. The directory layout
(``release/`` + model_args.json + tracker) is the one ``megatron_ext.checkpoints.checkpointing.save`` writes.

Reading: per tensor group, through ``dist_checkpointing.load`` with ShardedTensors covering one
layer's slice of the global (layer-stacked) tensors; any TP/PP layout the checkpoint was saved
under reads the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_ext import parallel
from megatron_ext.checkpoints import checkpointing, publish
from megatron_ext.config import ModelConfig
from megatron_ext.checkpoints.convert import architecture
from megatron_ext.checkpoints.convert.hf_config import ConversionError, ModelSpec
from megatron_ext.parallel.layout import Layout
from megatron_ext.checkpoints.convert.tables import checkpoint_key, state_dict_name

# (checkpoint key, chunk offset, chunk sizes, dtype) -> the chunk
Materialize = Callable[[str, Tuple[int, ...], Tuple[int, ...], torch.dtype], torch.Tensor]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------
# Process groups and model construction
# ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """Megatron's (trivial) groups for import/export, which run as one process.

    No CPU platform layer here: conversion runs no model code, and the platform's
    torch-function redirection would tax every tensor operation.
    """
    from megatron.core import parallel_state

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConversionError("hf-to-megatron / megatron-to-hf run as a single process (the "
                              "checkpoint holds global shapes); launch without torchrun")
    if parallel_state.model_parallel_is_initialized():
        yield  # the caller owns the groups
        return
    parallel.ensure_torch_distributed()
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def process_group(tp: int = 1, pp: int = 1) -> Iterator[None]:
    """TP/PP groups and the CPU platform layer, for running the model (parity checks); one
    process or torchrun. Megatron's groups are torn down on exit, torch.distributed is kept."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    parallel.ensure_torch_distributed()
    parallel.initialize(tp, pp, 1, device="cpu")
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


def converted_model(spec: ModelSpec, padded_vocab_size: int, dtype: torch.dtype,
                    make_vocab_size_divisible_by: int = 128, tp: int = 1, pp: int = 1,
                    seq_length: Optional[int] = None) -> Tuple[ModelConfig, Layout]:
    """The model a converted checkpoint holds, and the (one-replica) layout to build it under."""
    model = architecture.model_config(
        spec, padded_vocab_size, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, seq_length=seq_length)
    return model, Layout(tp, pp, error=ConversionError)


def build_meta_model(model: ModelConfig, layout: Layout = Layout()):
    """GPTModel (local spec, this process's TP/PP stage) with parameters on the meta device."""
    from megatron_ext.model import build_model, transformer_config

    config = transformer_config(model, layout, on_cpu=True)
    config.perform_initialization = False
    with torch.device("meta"):
        return build_model(model, layout, config, True)


def tensor_shapes(model) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------
# Streaming save
# ------------------------------------------------------------------------------------------

class TensorMaterializer:
    """A ``Materialize``: (checkpoint key, chunk offset, chunk sizes, dtype) -> that chunk, cut
    from one whole state-dict tensor that ``build(name, dtype)`` produces (from HF tensors for
    import, a weighted sum of checkpoints for merging).

    Layer-stacked keys ``decoder.layers.*`` are written one layer per chunk; the last tensor built
    is kept because Megatron saves some (linear_fc1) as several chunks, which then cost one build.
    Only one tensor is held at a time.
    """

    error = ConversionError  # what a malformed request raises (subclasses use their own type)

    def __init__(self, on_tensor: Callable[[], None] = lambda: None):
        self.on_tensor = on_tensor
        self._built: Optional[Tuple[str, torch.dtype]] = None
        self._tensor: Optional[torch.Tensor] = None

    def build(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, key: str, offset: Tuple[int, ...], sizes: Tuple[int, ...],
                 dtype: torch.dtype) -> torch.Tensor:
        layer, inner_offset, inner_sizes = None, offset, sizes
        if key.startswith("decoder.layers."):
            if sizes[0] != 1:
                raise self.error(f"{key}: expected one layer per chunk, got {sizes}")
            layer, inner_offset, inner_sizes = offset[0], offset[1:], sizes[1:]
        name = state_dict_name(key, layer)
        # The model decides each tensor's dtype (with --bf16 Megatron keeps RMSNorm weights fp32).
        if (name, dtype) != self._built:
            self._built, self._tensor = None, None  # drop the previous tensor before building
            self._tensor = self.build(name, dtype)
            self._built = (name, dtype)
            self.on_tensor()
        region = self._tensor[tuple(slice(o, o + s) for o, s in zip(inner_offset, inner_sizes))]
        return region.reshape(sizes)

class _MaterializingPlanner(MCoreSavePlanner):
    """Megatron's save planner, except tensors are produced on demand by ``materialize``."""

    def __init__(self, materialize: Materialize, on_tensor: Callable[[], None], **kwargs):
        super().__init__(**kwargs)
        self._materialize = materialize
        self._on_tensor = on_tensor

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        props = write_item.tensor_data.properties
        tensor = self._materialize(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes),
                                   props.dtype)
        if tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != props.dtype:
            raise ConversionError(f"{write_item.index.fqn} at {tuple(chunk.offsets)}: produced "
                                  f"{tuple(tensor.shape)} {tensor.dtype}, checkpoint expects "
                                  f"{tuple(chunk.sizes)} {props.dtype}")
        self._on_tensor()
        return tensor


class StreamingTorchDistSave(SaveShardedStrategy):
    """torch_dist (version 1) writer that materializes tensors one at a time."""

    def __init__(self, materialize: Materialize, on_tensor: Callable[[], None] = lambda: None):
        super().__init__("torch_dist", 1)
        self._materialize = materialize
        self._on_tensor = on_tensor

    @property
    def can_handle_sharded_objects(self):
        return True

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, is_loading=False)
        planner = _MaterializingPlanner(self._materialize, self._on_tensor,
                                        dedup_replicated_tensors=False, flatten_state_dict=False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
        # One writer process: DCP's plan exchange (pickling every plan) is not needed.
        dcp_save(pyt_state_dict, storage_writer=writer, planner=planner,
                 no_dist=torch.distributed.get_world_size() == 1)


def write_release(root: str, model, model_config: ModelConfig, materialize: Materialize,
                  extra_files: Dict[str, str], on_tensor: Callable[[], None] = lambda: None) -> str:
    """``root/release`` + model_args.json + tracker, the layout checkpointing.save writes."""
    final_dir = os.path.join(root, "release")
    tmp_dir = publish.start(final_dir)
    state = {
        "format_version": checkpointing.FORMAT_VERSION,
        "iteration": 0,
        "consumed_samples": 0,
        "layout": checkpointing._layout(),
        "model": model.sharded_state_dict(),
        "rng_state": checkpointing._rng_sharded_object(),
    }
    with warnings.catch_warnings():  # deprecations inside torch's checkpoint code, not ours
        warnings.simplefilter("ignore", FutureWarning)
        dist_checkpointing.save(state, tmp_dir,
                                sharded_strategy=StreamingTorchDistSave(materialize, on_tensor))
    with open(os.path.join(tmp_dir, "model_args.json"), "w") as f:
        json.dump(checkpointing.model_record(model_config), f, indent=2)
    for name, text in extra_files.items():
        with open(os.path.join(tmp_dir, name), "w") as f:
            f.write(text)
    publish.publish(tmp_dir, final_dir)
    publish.write_tracker(root, "release")
    return final_dir


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------

class MegatronCheckpointReader:
    """Reads state-dict-named tensors (local or TE spec names) from a torch_dist checkpoint."""

    def __init__(self, root: str):
        self.checkpoint_dir, _ = checkpointing.checkpoint_dir_to_load(root)
        self.model_args = checkpointing.read_model_args(self.checkpoint_dir)
        self._meta = dist_checkpointing.load_tensors_metadata(self.checkpoint_dir)

    def _locate(self, name: str):
        key, layer = checkpoint_key(name)
        if key not in self._meta:
            raise ConversionError(f"{self.checkpoint_dir} has no tensor {key} (for {name})")
        shape = tuple(self._meta[key].global_shape)
        if layer is not None:
            if layer >= shape[0]:
                raise ConversionError(f"{key} holds {shape[0]} layers, {name} asks for layer "
                                      f"{layer}")
            shape = shape[1:]
        return key, layer, shape

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._locate(name)[2]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self._locate(name)[0]].dtype

    def read(self, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        request = {}
        for name in names:
            key, layer, shape = self._locate(name)
            if layer is None:
                data = torch.empty(shape, dtype=self._meta[key].dtype)
                request[name] = ShardedTensor.from_rank_offsets(key, data, replica_id=0)
            else:  # the layer's [1, ...] slice of the [num_layers, ...] global tensor
                data = torch.empty((1, *shape), dtype=self._meta[key].dtype)
                num_layers = self._meta[key].global_shape[0]
                request[name] = ShardedTensor.from_rank_offsets(
                    key, data, (0, layer, num_layers), replica_id=0)
        with warnings.catch_warnings():  # deprecations inside Megatron's loader, not ours
            warnings.simplefilter("ignore", FutureWarning)
            loaded = dist_checkpointing.load(request, self.checkpoint_dir,
                                             validate_access_integrity=False)
        return {name: t.squeeze(0) if checkpoint_key(name)[1] is not None else t
                for name, t in loaded.items()}


def read_extra_file(checkpoint_dir: str, name: str) -> Optional[str]:
    path = os.path.join(checkpoint_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def dtype_from_name(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    from megatron_ext.checkpoints.convert.hf_config import DTYPES

    name = DTYPES.get(name, name)
    if name not in TORCH_DTYPES:
        raise ConversionError(f"unsupported dtype {name!r}; use one of fp32, bf16, fp16")
    return TORCH_DTYPES[name]

