"""``--data-path`` as Megatron-LM writes it: one prefix, or weight/prefix pairs."""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_ext.errors import ArgumentError


def parse_data_path(tokens: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """``[pathA]`` or ``[w1, pathA, w2, pathB, ...]`` -> (prefixes, weights or None)."""
    tokens = [t for tok in tokens for t in tok.split()]
    if len(tokens) == 1:
        return [tokens[0]], None
    if len(tokens) % 2 != 0:
        raise ArgumentError("--data-path with several datasets takes weight/prefix pairs: "
                            "0.7 pathA 0.3 pathB")
    weights, prefixes = [], []
    for weight, prefix in zip(tokens[0::2], tokens[1::2]):
        try:
            weights.append(float(weight))
        except ValueError:
            raise ArgumentError(f"--data-path: expected a weight before {prefix!r}, got {weight!r}")
        prefixes.append(prefix)
    if any(w <= 0 for w in weights):
        raise ArgumentError("--data-path weights must be positive")
    return prefixes, weights
