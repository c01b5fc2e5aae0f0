"""Logit parity: a HF model and a Megatron checkpoint on the same real text (``--text-file``, or
by default the Python standard library's module documentation).

Every rank builds its TP shard of the Megatron model (local spec, CPU, fp32) and loads the
checkpoint the way ``megatron_ext.train --finetune`` does; logits are gathered over TP. Rank 0 runs
the HF model in fp32 and compares the first ``vocab_size`` logits (Megatron's padding rows are not
part of the HF model). Launch with torchrun for TP > 1.

Megatron's GPTModel builds RoPE for positions 0..s-1 whatever position ids it is given, so the
comparison uses one contiguous sequence.
"""

from __future__ import annotations

import importlib
from typing import List, Optional

import torch

from megatron_ext.checkpoints.convert.hf_config import read_hf_config
from megatron_ext.checkpoints.convert.megatron_ckpt import converted_model


# English prose every Python installation has: the standard library's module documentation
# (about 3,000 tokens with a Llama-3 or SmolLM2 tokenizer), so verify needs no data download.
DEFAULT_TEXT_MODULES = ("argparse", "decimal", "difflib", "heapq", "textwrap", "fractions", "json",
                        "collections", "unittest", "pickle", "shlex", "string")


def default_text() -> str:
    """The default comparison text: the docstrings of ``DEFAULT_TEXT_MODULES``."""
    return "\n\n".join((importlib.import_module(name).__doc__ or "").strip()
                       for name in DEFAULT_TEXT_MODULES)


def tokenize(hf_dir: str, text: str, num_tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:num_tokens]
    return torch.tensor([ids], dtype=torch.long)


def megatron_logits(hf_dir: str, megatron_dir: str, tokens: torch.Tensor, tp: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, padded_vocab] of the Megatron checkpoint (on every rank)."""
    from megatron.core import tensor_parallel

    from megatron_ext.checkpoints import checkpointing
    from megatron_ext.model import build_model, transformer_config

    spec = read_hf_config(hf_dir)
    ckpt_dir, _ = checkpointing.checkpoint_dir_to_load(megatron_dir)
    saved = checkpointing.read_model_args(ckpt_dir)
    model_config, layout = converted_model(spec, saved["padded_vocab_size"], torch.float32, tp=tp,
                                           seq_length=tokens.shape[1])
    tensor_parallel.model_parallel_cuda_manual_seed(1234)  # the RNG tracker attention expects
    config = transformer_config(model_config, layout, on_cpu=True)
    config.perform_initialization = False
    model = build_model(model_config, layout, config, True)
    checkpointing.load(megatron_dir, [model], None, None, model_config)
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    with torch.no_grad():
        logits = model(tokens, positions, None)
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def compare(hf: torch.Tensor, megatron: torch.Tensor, vocab_size: int) -> dict:
    megatron = megatron[..., :vocab_size].float()
    hf = hf.float()
    diff = (hf - megatron).abs()
    agree = (hf.argmax(-1) == megatron.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "next_token_agreement": agree, "tokens": int(hf.shape[1]),
            "max_abs_logit": hf.abs().max().item()}


def verify(hf_dir: str, megatron_dir: str, tensor_model_parallel_size: int = 1,
           num_tokens: int = 512, text: Optional[str] = None, max_abs_tol: float = 1e-3,
           min_agreement: float = 0.999) -> dict:
    """Returns the comparison on rank 0 (``ok`` says whether it is within tolerance)."""
    from megatron_ext import parallel

    from megatron_ext.checkpoints.convert.megatron_ckpt import process_group

    tp = tensor_model_parallel_size
    spec = read_hf_config(hf_dir)
    num_tokens = min(num_tokens, spec.max_position_embeddings)
    with process_group(tp=tp):
        tokens = tokenize(hf_dir, text if text is not None else default_text(), num_tokens)
        logits = megatron_logits(hf_dir, megatron_dir, tokens, tp)
        result = {}
        if parallel.is_rank0():
            result = compare(hf_logits(hf_dir, tokens), logits, spec.vocab_size)
            result.update(tp=tp, max_abs_tol=max_abs_tol, min_agreement=min_agreement,
                          ok=result["max_abs_diff"] <= max_abs_tol
                          and result["next_token_agreement"] >= min_agreement)
        if torch.distributed.get_world_size() > 1:
            holder: List[dict] = [result]
            torch.distributed.broadcast_object_list(holder, src=0)
            result = holder[0]
    return result


__all__ = ["verify", "compare", "default_text"]

