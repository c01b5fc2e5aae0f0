"""HF folder (config.json + safetensors) -> Megatron-Core torch_dist 'release' checkpoint.

    DST/latest_checkpointed_iteration.txt      "release"
    DST/release/                               torch_dist shards, common.pt, model_args.json,
                                               hf_config.json (the source config, for export)
    DST/megatron_args.txt                      the megatron_ext.train flags, one per line
    DST/megatron_args.json                     the same, plus provenance and notes

The checkpoint stores global (TP=1) shapes, so ``megatron_ext.train --load DST --finetune`` reads it
under any TP/PP layout; the layout given here is validated and recorded as the suggestion.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from megatron_ext.checkpoints.convert import engine
from megatron_ext.checkpoints.convert.architecture import model_flags
from megatron_ext.checkpoints.convert.hf_config import (ConversionError, ModelSpec, check_layout,
                                                        padded_vocab_size, read_hf_config)
from megatron_ext.checkpoints.convert.hf_io import HFCheckpointReader
from megatron_ext.checkpoints.convert.megatron_ckpt import (TensorMaterializer, build_meta_model,
                                                            converted_model, dtype_from_name,
                                                            single_process_group, tensor_shapes,
                                                            write_release)

_ST_TO_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class _Materializer(TensorMaterializer):
    """Checkpoint chunks built from the HF tensors by the family's table rules."""

    def __init__(self, spec: ModelSpec, reader: HFCheckpointReader, shapes: Dict[str, tuple],
                 on_new_tensor):
        super().__init__(on_new_tensor)
        self.spec, self.reader, self.shapes = spec, reader, shapes
        self.by_name = {m.megatron: m for m in engine.mappings(spec)}

    def build(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        mapping = self.by_name.get(name)
        if mapping is None:
            raise ConversionError(f"no {self.spec.family.name} table rule produces {name}")
        parts = [self.reader.get(n) for n in mapping.hf]
        return engine.to_megatron(mapping, parts, self.shapes[name], self.spec, dtype)


def _flag_lines(flags: List[str]) -> List[str]:
    lines: List[str] = []
    for token in flags:
        if token.startswith("--") or not lines:
            lines.append(token)
        else:
            lines[-1] += " " + token
    return lines


def _tokenizer_note(hf_dir: str, padded: int, divisible_by: int, tp: int) -> Optional[str]:
    """train.py sizes the embedding from the tokenizer; warn when that disagrees."""
    names = os.listdir(hf_dir)
    if not any(n.startswith("tokenizer") for n in names):
        return None
    try:
        from megatron_ext.data.tokenizer import HuggingFaceTokenizer

        n_tokens = HuggingFaceTokenizer(hf_dir).vocab_size
    except Exception as err:  # a tokenizer we cannot load is the user's business, not ours
        return f"could not load the tokenizer in {hf_dir} ({err.__class__.__name__})"
    from_tokenizer = padded_vocab_size(n_tokens, divisible_by, tp)
    if from_tokenizer != padded:
        return (f"the tokenizer has {n_tokens} tokens, which megatron_ext.train pads to "
                f"{from_tokenizer}, but the checkpoint's embedding has {padded} rows: --finetune "
                "will refuse this pairing")
    return None


def hf_to_megatron(hf_dir: str, megatron_dir: str, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1, dtype: Optional[str] = None,
                   make_vocab_size_divisible_by: int = 128, progress: bool = True,
                   check_tokenizer: bool = True) -> dict:
    """Convert; returns a summary (flags, padded vocab, dtype, tensor count).

    ``check_tokenizer`` loads the folder's tokenizer the way megatron_ext.train does and notes
    when its padded size disagrees with the checkpoint's (about a second, mostly importing
    transformers).
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    spec = read_hf_config(hf_dir)
    check_layout(spec, tp, pp)
    reader = HFCheckpointReader(hf_dir)
    torch_dtype = (dtype_from_name(dtype) or dtype_from_name(spec.dtype)
                   or _ST_TO_TORCH[reader.dtype_name(next(iter(reader.shapes())))])
    padded = padded_vocab_size(spec.vocab_size, make_vocab_size_divisible_by, tp)
    model_config, _ = converted_model(spec, padded, torch_dtype, make_vocab_size_divisible_by)
    with open(os.path.join(hf_dir, "config.json")) as f:
        source_config = f.read()

    shapes = engine.megatron_shapes(spec, padded)
    engine.check_megatron(spec, shapes)
    engine.check_hf(spec, reader.shapes(), shapes)  # fail fast: before any process group

    with single_process_group():
        model = build_meta_model(model_config)
        engine.compare_shapes(shapes, tensor_shapes(model), "Megatron-Core's GPTModel")
        n_tensors = len(engine.mappings(spec))
        bar = tqdm(total=n_tensors, unit="tensor", desc="hf-to-megatron", disable=not progress,
                   file=sys.stderr)
        materialize = _Materializer(spec, reader, shapes, lambda: bar.update(1))
        release_dir = write_release(megatron_dir, model, model_config, materialize,
                                    {"hf_config.json": source_config})
        bar.close()
        reader.release()

    flags = model_flags(spec, make_vocab_size_divisible_by)
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    notes = []
    if padded != spec.vocab_size:
        notes.append(f"vocabulary padded from {spec.vocab_size} to {padded} rows (zeros); "
                     "megatron-to-hf removes them")
    if spec.sliding_window and spec.sliding_window < spec.max_position_embeddings:
        notes.append(f"sliding_window={spec.sliding_window} is kept for export, but megatron_ext "
                     "trains with full causal attention: keep --seq-length <= sliding_window")
    other = [t for t in range(1, 9) if spec.num_query_groups % t == 0
             and padded_vocab_size(spec.vocab_size, make_vocab_size_divisible_by, t) != padded]
    if other:
        notes.append(f"megatron_ext.train pads the vocabulary to a multiple of "
                     f"lcm({make_vocab_size_divisible_by}, TP): with TP in {other} that is not "
                     f"{padded} rows, so convert again with that --tensor-model-parallel-size")
    note = _tokenizer_note(hf_dir, padded, make_vocab_size_divisible_by, tp) if check_tokenizer \
        else None
    if note:
        notes.append(note)
    summary = {
        "source": os.path.abspath(hf_dir), "family": spec.family.name,
        "architecture": spec.family.architecture, "dtype": str(torch_dtype).replace("torch.", ""),
        "vocab_size": spec.vocab_size, "padded_vocab_size": padded, "tensors": n_tensors,
        "model_flags": flags, "layout_flags": layout,
        "tokenizer_flags": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            os.path.abspath(hf_dir)],
        "checkpoint": release_dir, "notes": notes,
    }
    with open(os.path.join(megatron_dir, "megatron_args.txt"), "w") as f:
        f.write("\n".join(_flag_lines(flags + layout)) + "\n")
    with open(os.path.join(megatron_dir, "megatron_args.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary

