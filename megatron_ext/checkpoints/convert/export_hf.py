"""Megatron-Core torch_dist checkpoint (any TP/PP it was saved under) -> HF folder.

The HF config comes from, in order: ``--reference-hf-dir``'s config.json, the ``hf_config.json`` an
import stored next to the weights, or (with a warning) the checkpoint's model_args.json alone. Its
architecture fields must agree with the checkpoint's model_args.json. The config is written by the
installed transformers (``save_pretrained``), so its layout is the installed version's; RoPE
settings are carried over unchanged, and checked by reading the written config back.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Optional

import torch
from tqdm import tqdm

from megatron_ext.checkpoints.convert import engine
from megatron_ext.checkpoints.convert.architecture import spec_from_model_args, spec_matches_model_args
from megatron_ext.checkpoints.convert.hf_config import ConversionError, read_hf_config, to_hf_config
from megatron_ext.checkpoints.convert.hf_io import SafetensorsShardWriter, copy_tokenizer_files, parse_size
from megatron_ext.checkpoints.convert.megatron_ckpt import (MegatronCheckpointReader, dtype_from_name,
                                                read_extra_file, single_process_group)


def _reference_config(reader: MegatronCheckpointReader, reference_hf_dir: Optional[str]):
    if reference_hf_dir:
        path = os.path.join(reference_hf_dir, "config.json")
        if not os.path.exists(path):
            raise ConversionError(f"--reference-hf-dir {reference_hf_dir} has no config.json")
        with open(path) as f:
            return json.load(f), path
    stored = read_extra_file(reader.checkpoint_dir, "hf_config.json")
    if stored is not None:
        return json.loads(stored), os.path.join(reader.checkpoint_dir, "hf_config.json")
    return None, None


def _read_batches(groups, reader: MegatronCheckpointReader):
    """Consecutive tensor groups merged into reads of at most the largest group's bytes: each read
    has a fixed cost (planning, metadata), and small layers would otherwise pay it many times."""
    def nbytes(group):
        return sum(torch.Size(reader.shape(m.megatron)).numel()
                   * torch.empty((), dtype=reader.dtype(m.megatron)).element_size() for m in group)

    sizes = [nbytes(g) for g in groups]
    budget, batch, used = max(sizes), [], 0
    for group, size in zip(groups, sizes):
        if batch and used + size > budget:
            yield batch
            batch, used = [], 0
        batch += group
        used += size
    if batch:
        yield batch


def megatron_to_hf(megatron_dir: str, hf_dir: str, reference_hf_dir: Optional[str] = None,
                   dtype: Optional[str] = None, max_shard_size: str = "5GB",
                   progress: bool = True) -> dict:
    with single_process_group():
        reader = MegatronCheckpointReader(megatron_dir)
        reference, reference_path = _reference_config(reader, reference_hf_dir)
        if reference is not None:
            spec = read_hf_config(reference)
            diffs = spec_matches_model_args(spec, reader.model_args)
            if diffs:
                raise ConversionError(f"{reference_path} does not describe the model in "
                                      f"{reader.checkpoint_dir}: {'; '.join(diffs)}")
        else:
            spec = spec_from_model_args(reader.model_args)
            warnings.warn(f"no HF config for {reader.checkpoint_dir}: exporting as "
                          f"{spec.family.architecture} with the padded vocabulary "
                          f"({spec.vocab_size}) and the RoPE scaling model_args.json records; "
                          f"pass --reference-hf-dir")

        groups = engine.groups(spec)
        megatron_shapes = {m.megatron: reader.shape(m.megatron) for g in groups for m in g}
        engine.compare_shapes(engine.megatron_shapes(spec, reader.model_args["padded_vocab_size"]),
                              megatron_shapes, f"checkpoint {reader.checkpoint_dir}")
        expected = engine.hf_shapes(spec, megatron_shapes)
        out_dtype = dtype_from_name(dtype) or reader.dtype(groups[0][0].megatron)
        entries = [(name, expected[name], out_dtype) for g in groups for m in g for name in m.hf]
        writer = SafetensorsShardWriter(hf_dir, entries, parse_size(max_shard_size))
        bar = tqdm(total=len(entries), unit="tensor", desc="megatron-to-hf", disable=not progress,
                   file=sys.stderr)
        for batch in _read_batches(groups, reader):
            tensors = reader.read([m.megatron for m in batch])
            for m in batch:
                for name, tensor in engine.to_hf(m, tensors.pop(m.megatron), spec, out_dtype):
                    writer.write(name, tensor)
                    bar.update(1)
            del tensors
        files = writer.close()
        bar.close()

    config = to_hf_config(spec, reference, dtype=str(out_dtype).replace("torch.", ""))
    config.save_pretrained(hf_dir)
    written = read_hf_config(hf_dir)
    for field in ("rope_theta", "rope_scaling", "vocab_size", "num_layers", "num_query_groups",
                  "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        if getattr(written, field) != getattr(spec, field):
            raise ConversionError(f"exported config.json changed {field}: "
                                  f"{getattr(spec, field)!r} -> {getattr(written, field)!r}")
    copied = copy_tokenizer_files(reference_hf_dir, hf_dir) if reference_hf_dir else []
    return {"files": files, "tensors": len(entries), "dtype": str(out_dtype).replace("torch.", ""),
            "architecture": spec.family.architecture, "copied": copied,
            "config_from": reference_path}
