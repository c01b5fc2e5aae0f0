"""Parsing of the evaluation's list options (lengths, depths), shared by the evaluation command
and the training hook; it depends on nothing but the error type, so neither imports the other."""

from __future__ import annotations

from typing import List

from megatron_ext.errors import ArgumentError


def parse_lengths(text: str, flag: str = "--lengths") -> List[int]:
    """``"512,1K,64k"`` -> [512, 1024, 65536]."""
    lengths = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        scale = 1024 if part[-1] in "kK" else 1
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit():
            raise ArgumentError(f"{flag}: {part!r} is not a token count (e.g. 2048 or 2K)")
        lengths.append(int(digits) * scale)
    if not lengths:
        raise ArgumentError(f"{flag} is empty")
    return lengths


def parse_depths(text: str, flag: str = "--depths") -> List[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ArgumentError(f"{flag}: {text!r} is not a list of fractions like 0,0.5,1") from None
