"""One vocabulary for dtypes on the command line: fp32, bf16, fp16 (Megatron-LM's --bf16/--fp16
spelling). torch's names (float32, bfloat16, float16) are accepted and mean the same."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(text: str) -> str:
    """argparse ``type=``: the canonical short name of ``text``."""
    name = ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[dtype_name(name)]
