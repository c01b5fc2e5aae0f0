"""The offline demo corpus, tokenized once: long books and repository-level code.

The blend mixes the six Austen novels (100k-230k tokens each) with the Python standard library
(one document per package), the two long-context domains obtainable without a model hub, tokenized
with Mistral's Llama-style SentencePiece model. Outputs live in the asset cache, outside git.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

from dev import assets
from megatron_ext.data.preprocess import output_prefix_for, preprocess
from megatron_ext.data.token_flags import has_flags

DEMO_BLEND = (("austen", 0.5), ("pystdlib", 0.5))
SEGMENT_UNITS = {"austen": "sentence", "pystdlib": "line"}
TOKENIZER_TYPE = "SentencePieceTokenizer"


def demo_data_dir() -> str:
    return str(assets.cache_dir() / "demo-data")


def prepare_demo_data(out_dir: Optional[str] = None, workers: int = 1) -> Tuple[str, str]:
    """Returns (--data-path blend string, --tokenizer-model path); tokenizes only what is missing."""
    out_dir = out_dir or demo_data_dir()
    tokenizer_model = str(assets.mistral_sentencepiece_model())
    parts = []
    for name, weight in DEMO_BLEND:
        prefix = os.path.join(out_dir, name)
        built = output_prefix_for(prefix, "text")
        # Several ranks or sessions may ask at once: one tokenizes, the others wait and reuse.
        with assets.asset_lock(f"demo-data-{name}"):
            if not (os.path.exists(built + ".idx") and has_flags(built)):
                stats = preprocess([str(assets.corpus_jsonl(name))], prefix, TOKENIZER_TYPE,
                                   tokenizer_model, append_eod=True, workers=workers, progress=False,
                                   segment_unit=SEGMENT_UNITS.get(name, "sentence"))
                print(f"{name}: {stats.summary()}", file=sys.stderr)
        parts += [str(weight), built]
    return " ".join(parts), tokenizer_model
