"""Load a Hugging Face scoring model and tokenizer and build the requested scorer."""

from __future__ import annotations

import os
import sys

import torch

from megatron_ext.dtypes import ALIASES, DTYPES
from megatron_ext.selection.ladm.delta_ppl import ProlongScorer
from megatron_ext.selection.ladm.scores_io import InputError
from megatron_ext.selection.ladm.scoring import CdsScorer, CdsSettings



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 on CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise InputError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def load_tokenizer(model_dir: str):
    """The model folder's tokenizer, or None when it has none (pre-tokenized input only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None


def model_vocab_size(model_dir: str, seq_length: int) -> int:
    """Check the model folder (cheaply: its config only) and return the vocabulary size."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise InputError(f"--model {model_dir}: no config.json; pass a Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and seq_length > max_positions:
        print(f"warning: --seq-length {seq_length} exceeds the model's max_position_embeddings "
              f"({max_positions}); attention past it is extrapolated", file=sys.stderr)
    return config.vocab_size


def build_scorer(settings, model_dir: str, dtype: str = "auto", device: str = "auto"):
    """A ``CdsScorer`` for ``CdsSettings`` (decoder only) or a ``ProlongScorer`` for
    ``ProlongSettings`` (needs the LM head), with the model loaded on ``device``."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    cls = AutoModel if isinstance(settings, CdsSettings) else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(torch_device).eval()
    if isinstance(settings, CdsSettings):
        return CdsScorer(model, settings)
    return ProlongScorer(model, settings)
