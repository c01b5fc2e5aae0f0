"""Weighted average of model checkpoints (LongRecipe stage 2: 0.5 x extended + 0.5 x original).

Two kinds of input, never mixed:

  HF folders (safetensors)   every tensor averaged in fp32 and written in the first input's dtype
                             (per tensor); config.json, tokenizer files, chat template and
                             generation config are the FIRST input's.
  megatron_ext checkpoints   torch_dist directories with a latest_checkpointed_iteration.txt
                             tracker (training saves or tools/convert_checkpoint.py imports, any
                             TP/PP layout); written as a 'release' checkpoint that
                             ``megatron_ext.train --load OUT --finetune`` and
                             ``convert_checkpoint.py megatron-to-hf`` read, with the FIRST input's
                             model_args.json (and hf_config.json when it has one).

List the context-extended model first: its config (RoPE base, max positions) is the one kept, as in
the paper's merge. Only model weights are merged (not optimizer state or buffers). One tensor per
input is in memory at a time. The result is written next to OUTPUT and renamed into place at the
end, so a failed merge leaves no checkpoint-looking directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from megatron_ext.dtypes import DTYPES
from megatron_ext.errors import UserError

HF, MEGATRON = "hf", "megatron"
# megatron_ext.checkpoints.checkpointing.TRACKER_FILE; not imported here because it pulls in Megatron-Core,
# which an HF merge does not need.
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
              "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}


class MergeError(UserError):
    """Inputs that cannot be merged; the message names the input, tensor or flag."""


Warn = Callable[[str], None]


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------
# Validation shared by both kinds
# ------------------------------------------------------------------------------------------

def checkpoint_kind(path: str) -> str:
    if not os.path.isdir(path):
        raise MergeError(f"--inputs {path}: no such directory")
    if os.path.exists(os.path.join(path, TRACKER_FILE)):
        return MEGATRON
    if any(name.endswith(".safetensors") for name in os.listdir(path)):
        return HF
    raise MergeError(f"--inputs {path}: neither a HF folder (*.safetensors) nor a megatron_ext "
                     f"checkpoint ({TRACKER_FILE}); PyTorch .bin folders must be re-saved with "
                     "save_pretrained(safe_serialization=True)")


def check_weights(inputs: Sequence[str], weights: Optional[Sequence[float]],
                  warn: Warn = _default_warn) -> List[float]:
    """One weight per input (equal weights when None); warns when they do not sum to 1."""
    if len(inputs) < 2:
        raise MergeError(f"--inputs needs at least two checkpoints, got {len(inputs)}")
    if weights is None:
        return [1.0 / len(inputs)] * len(inputs)
    if len(weights) != len(inputs):
        raise MergeError(f"--weights has {len(weights)} values for {len(inputs)} --inputs; give "
                         "one weight per input, in the same order")
    total = float(sum(weights))
    if abs(total - 1.0) > 1e-6:
        warn(f"--weights sum to {total:g}, not 1: the merged weights are scaled by {total:g} "
             "relative to an average")
    return [float(w) for w in weights]


def compare_tensors(reference_name: str, reference: Dict[str, Tuple[int, ...]], other_name: str,
                    other: Dict[str, Tuple[int, ...]]) -> None:
    """Same tensor names and shapes, or a MergeError naming the differences."""
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{other_name} lacks {len(missing)} tensor(s) of {reference_name}: "
                         f"{', '.join(missing[:8])}")
        if extra:
            parts.append(f"{other_name} has {len(extra)} tensor(s) {reference_name} lacks: "
                         f"{', '.join(extra[:8])}")
        raise MergeError("the inputs hold different tensors (different architectures?): "
                         + "; ".join(parts))
    for name, shape in reference.items():
        if tuple(other[name]) != tuple(shape):
            raise MergeError(f"tensor {name}: shape {tuple(shape)} in {reference_name} but "
                             f"{tuple(other[name])} in {other_name}; only models of the same "
                             "architecture and vocabulary can be merged")


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 dtype: torch.dtype) -> torch.Tensor:
    """sum_i w_i * t_i accumulated in fp32 (fp64 for fp64 inputs), cast to ``dtype``."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = tensors[0].to(acc_dtype) * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        acc += tensor.to(acc_dtype) * weight
    return acc.to(dtype)


def _prepare_output(output: str, inputs: Sequence[str], overwrite: bool) -> str:
    out = os.path.abspath(output)
    if any(out == os.path.abspath(p) for p in inputs):
        raise MergeError(f"--output {output} is one of the --inputs; write the merge elsewhere")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise MergeError(f"--output {output} exists and is not empty; remove it or pass "
                         "--overwrite")
    staging = out.rstrip(os.sep) + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _publish(staging: str, output: str) -> None:
    out = os.path.abspath(output)
    if os.path.isdir(out):
        shutil.rmtree(out)
    elif os.path.exists(out):
        os.remove(out)
    os.replace(staging, out)


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------

def merge_checkpoints(inputs: Sequence[str], output: str,
                      weights: Optional[Sequence[float]] = None, dtype: Optional[str] = None,
                      max_shard_size: str = "5GB", overwrite: bool = False,
                      progress: bool = True, warn: Warn = _default_warn) -> dict:
    """Merge; returns a summary (kind, tensors, weights, notes)."""
    weights = check_weights(inputs, weights, warn)
    kinds = [checkpoint_kind(p) for p in inputs]
    if len(set(kinds)) > 1:
        listing = ", ".join(f"{p} ({k})" for p, k in zip(inputs, kinds))
        raise MergeError(f"--inputs mix HF folders and Megatron checkpoints ({listing}); convert "
                         "them to one kind first with tools/convert_checkpoint.py")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    staging = _prepare_output(output, inputs, overwrite)
    try:
        run = merge_hf if kinds[0] == HF else merge_megatron
        summary = run(list(inputs), weights, staging, DTYPES.get(dtype), max_shard_size,
                      progress, warn)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, output)
    summary.update(kind=kinds[0], inputs=[os.path.abspath(p) for p in inputs], weights=weights,
                   output=os.path.abspath(output))
    return summary


# ------------------------------------------------------------------------------------------
# HF folders
# ------------------------------------------------------------------------------------------

def _config_differences(first: str, other: str) -> List[str]:
    def load(folder):
        path = os.path.join(folder, "config.json")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)

    a, b = load(first), load(other)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def merge_hf(inputs: List[str], weights: List[float], output: str,
             dtype: Optional[torch.dtype], max_shard_size: str, progress: bool,
             warn: Warn) -> dict:
    from megatron_ext.checkpoints.convert.hf_io import (
        INDEX_FILE, HFCheckpointReader, SafetensorsShardWriter, copy_tokenizer_files, parse_size)

    readers = [HFCheckpointReader(p) for p in inputs]
    reference = readers[0].shapes()
    for path, reader in zip(inputs[1:], readers[1:]):
        compare_tensors(inputs[0], reference, path, reader.shapes())
    if not os.path.exists(os.path.join(inputs[0], "config.json")):
        raise MergeError(f"--inputs {inputs[0]}: no config.json (the first input's config is "
                         "the merged model's)")
    entries = []
    for name, shape in reference.items():
        st_dtype = readers[0].dtype_name(name)
        if st_dtype not in _ST_DTYPES:
            raise MergeError(f"tensor {name} in {inputs[0]} has dtype {st_dtype}, which this "
                             f"merge does not handle (supported: {', '.join(_ST_DTYPES)})")
        source = _ST_DTYPES[st_dtype]
        entries.append((name, shape, dtype if dtype is not None and source.is_floating_point
                        else source))

    writer = SafetensorsShardWriter(output, entries, parse_size(max_shard_size))
    bar = tqdm(total=len(entries), unit="tensor", desc="merge", disable=not progress,
               file=sys.stderr)
    copied_integer = []
    for name, _, out_dtype in entries:
        tensors = [reader.get(name) for reader in readers]
        if out_dtype.is_floating_point:
            merged = weighted_sum(tensors, weights, out_dtype)
        else:  # integer buffers (e.g. step counters) cannot be averaged: they must agree
            if not all(torch.equal(tensors[0], t) for t in tensors[1:]):
                raise MergeError(f"integer tensor {name} differs between the inputs and cannot "
                                 "be averaged")
            merged = tensors[0]
            copied_integer.append(name)
        writer.write(name, merged)
        del tensors, merged
        bar.update(1)
    files = writer.close()
    bar.close()
    for reader in readers:
        reader.release()

    _write_config(inputs[0], output, dtype)
    copied = ["config.json"] + copy_tokenizer_files(inputs[0], output)
    weight_files = {n for n in os.listdir(inputs[0])
                    if n.endswith(".safetensors") or n == INDEX_FILE}
    left_out = sorted(n for n in os.listdir(inputs[0]) if n not in weight_files
                      and n not in copied and os.path.isfile(os.path.join(inputs[0], n)))
    notes = []
    for other in inputs[1:]:
        diffs = _config_differences(inputs[0], other)
        if diffs:
            notes.append(f"config.json of {other} differs in {', '.join(diffs)}: the merged "
                         f"model keeps {inputs[0]}'s")
    if left_out:
        notes.append(f"not copied from {inputs[0]}: {', '.join(left_out)}")
    if copied_integer:
        notes.append(f"integer tensors copied unchanged: {', '.join(copied_integer[:8])}")
    return {"tensors": len(entries), "files": files, "copied": copied, "notes": notes}


def _write_config(source: str, output: str, dtype: Optional[torch.dtype]) -> None:
    src = os.path.join(source, "config.json")
    dst = os.path.join(output, "config.json")
    if dtype is None:
        shutil.copyfile(src, dst)  # byte for byte: the long-context config is the point
        return
    with open(src) as f:
        config = json.load(f)
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = str(dtype).replace("torch.", "")
    with open(dst, "w") as f:
        json.dump(config, f, indent=2)


# ------------------------------------------------------------------------------------------
# megatron_ext (torch_dist) checkpoints
# ------------------------------------------------------------------------------------------

def _model_tensor_shapes(checkpoint_dir: str) -> Dict[str, Tuple[int, ...]]:
    """Global shapes of the model's tensors (optimizer state left out)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(checkpoint_dir)
    return {k: tuple(v.global_shape) for k, v in meta.items() if not k.startswith("optimizer.")}


def _checkpoint_shapes(state_dict_shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """State-dict shapes -> checkpoint keys and global shapes (layers stacked on a leading axis)."""
    from megatron_ext.checkpoints.convert.tables import checkpoint_key

    out: Dict[str, Tuple[int, ...]] = {}
    layers: Dict[str, int] = {}
    for name, shape in state_dict_shapes.items():
        key, layer = checkpoint_key(name)
        out[key] = tuple(shape)
        if layer is not None:
            layers[key] = max(layers.get(key, 0), layer + 1)
    return {k: (layers[k], *shape) if k in layers else shape for k, shape in out.items()}


def _averaging_materializer(readers, weights: List[float], on_tensor: Callable[[], None]):
    """Checkpoint chunks of the weighted sum of the inputs' tensors (one tensor at a time)."""
    from megatron_ext.checkpoints.convert.megatron_ckpt import TensorMaterializer

    class Averaging(TensorMaterializer):
        error = MergeError

        def build(self, name: str, dtype: torch.dtype) -> torch.Tensor:
            tensors = [reader.read([name])[name] for reader in readers]
            return weighted_sum(tensors, weights, dtype)

    return Averaging(on_tensor)


def _model_for(model_args: dict, dtype: torch.dtype):
    """The model a checkpoint's model_args.json describes (shapes and dtype)."""
    from megatron_ext.checkpoints import checkpointing
    from megatron_ext.checkpoints.convert.architecture import spec_from_model_args
    from megatron_ext.checkpoints.convert.hf_config import ConversionError
    from megatron_ext.checkpoints.convert.megatron_ckpt import converted_model

    try:
        spec = spec_from_model_args(model_args)
    except (KeyError, ConversionError) as err:
        raise MergeError(f"model_args.json cannot describe a model: {err}") from None
    model, _ = converted_model(spec, model_args["padded_vocab_size"], dtype,
                               seq_length=model_args.get("seq_length"))
    rebuilt = checkpointing.architecture_of(model)
    differing = [f"{k}: {model_args[k]!r} vs {rebuilt[k]!r}" for k in rebuilt
                 if k in model_args and model_args[k] != rebuilt[k]]
    if differing:
        raise MergeError("this merge rebuilds Llama-family models (RMSNorm, SwiGLU, no linear "
                         f"biases) and cannot reproduce the checkpoint's {'; '.join(differing)}")
    return model


def merge_megatron(inputs: List[str], weights: List[float], output: str,
                   dtype: Optional[torch.dtype], max_shard_size: str, progress: bool,
                   warn: Warn) -> dict:
    from megatron_ext.checkpoints.checkpointing import CheckpointError
    from megatron_ext.checkpoints.convert.hf_config import ConversionError
    from megatron_ext.checkpoints.convert.megatron_ckpt import (MegatronCheckpointReader, build_meta_model,
                                                                read_extra_file, single_process_group,
                                                                tensor_shapes, write_release)

    with single_process_group():
        try:
            readers = [MegatronCheckpointReader(p) for p in inputs]
        except (CheckpointError, ConversionError) as err:
            raise MergeError(str(err)) from None
        shapes = [_model_tensor_shapes(r.checkpoint_dir) for r in readers]
        for reader, other in zip(readers[1:], shapes[1:]):
            compare_tensors(readers[0].checkpoint_dir, shapes[0], reader.checkpoint_dir, other)

        first = readers[0].model_args
        out_dtype = dtype or readers[0].dtype("embedding.word_embeddings.weight")
        model_config = _model_for(first, out_dtype)
        model = build_meta_model(model_config)
        state_shapes = tensor_shapes(model)
        expected = _checkpoint_shapes(state_shapes)
        compare_tensors("the model rebuilt from model_args.json", expected,
                        readers[0].checkpoint_dir, shapes[0])

        notes = []
        for reader in readers[1:]:
            diffs = sorted(k for k in set(first) | set(reader.model_args)
                           if first.get(k) != reader.model_args.get(k))
            if diffs:
                notes.append(f"model_args.json of {reader.checkpoint_dir} differs in "
                             f"{', '.join(diffs)}: the merged checkpoint keeps "
                             f"{readers[0].checkpoint_dir}'s")
        # write_release writes model_args.json from the model config, then these files: listing it
        # here keeps the first input's file exactly (seq_length and all).
        extra = {"model_args.json": json.dumps(first, indent=2),
                 "merge.json": json.dumps({"inputs": [os.path.abspath(p) for p in inputs],
                                           "weights": weights}, indent=2)}
        hf_config = read_extra_file(readers[0].checkpoint_dir, "hf_config.json")
        if hf_config is not None:
            extra["hf_config.json"] = hf_config
        bar = tqdm(total=len(state_shapes), unit="tensor", desc="merge", disable=not progress,
                   file=sys.stderr)
        materialize = _averaging_materializer(readers, weights, lambda: bar.update(1))
        release_dir = write_release(output, model, model_config, materialize, extra)
        bar.close()

    flags = os.path.join(inputs[0], "megatron_args.txt")
    if os.path.exists(flags):  # the converter's train flags: the first input's model
        shutil.copyfile(flags, os.path.join(output, "megatron_args.txt"))
    with open(os.path.join(release_dir, "model_args.json")) as f:
        if json.load(f) != first:
            raise MergeError("internal: the merged model_args.json differs from the first "
                             "input's")
    return {"tensors": len(state_shapes), "checkpoint": os.path.join(os.path.abspath(output),
                                                                  "release"),
            "dtype": str(out_dtype).replace("torch.", ""), "notes": notes}
