"""Loader throughput with LongRecipe positions against contiguous positions, on real data.

    PYTHONPATH=. python benchmarks/loader_overhead.py [--seq-length 8192 --target 32768 --samples 200]

Both loaders are the training loader (``MicroBatchIterator`` over ``build_gpt_datasets`` of the tokenized Austen novels and
Python standard library, weighted 0.5/0.5): the baseline with contiguous ids reads exactly what
Megatron-Core's GPTDataset reads; longrecipe additionally reads the token flags of the window and
draws the position ids. They alternate in rounds over the same sample indices so that a change in
machine speed hits both alike. Last line: JSON with ratio = samples/s(longrecipe) /
samples/s(contiguous) (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from megatron_ext.arguments import parse_data_path  # noqa: E402
from dev.demo_data import TOKENIZER_TYPE, prepare_demo_data  # noqa: E402
from megatron_ext.data.gpt_data import BatchLayout, MicroBatchIterator, build_gpt_datasets  # noqa: E402
from megatron_ext.data.tokenizer import build_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--target", type=int, default=32768)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    blend, tokenizer_model = prepare_demo_data()
    tokenizer = build_tokenizer(TOKENIZER_TYPE, tokenizer_model)
    cache = tempfile.mkdtemp(prefix="loader-bench-")
    loaders = {
        scheme: build_gpt_datasets(parse_data_path(blend.split()), "100,0,0", args.seq_length, 1,
                                   tokenizer, [args.samples, 0, 0], cache, position_scheme=scheme,
                                   target_seq_length=args.target)[0]
        for scheme in ("contiguous", "longrecipe")}

    def read_all(dataset) -> float:
        batches = MicroBatchIterator(dataset, BatchLayout(1, 1, 0, 1))  # micro-batches of 1
        start = time.perf_counter()
        for _ in range(args.samples):
            next(batches)
        return args.samples / (time.perf_counter() - start)

    for dataset in loaders.values():  # warm the page cache and the lazily loaded indices
        read_all(dataset)
    rates = {scheme: [] for scheme in loaders}
    for round_ in range(args.rounds):
        order = list(loaders) if round_ % 2 == 0 else list(reversed(loaders))
        for scheme in order:
            rates[scheme].append(read_all(loaders[scheme]))
    contiguous = statistics.median(rates["contiguous"])
    longrecipe = statistics.median(rates["longrecipe"])
    print(f"contiguous: {contiguous:.1f} samples/s | longrecipe: {longrecipe:.1f} samples/s "
          f"(seq {args.seq_length}, target {args.target}, {args.samples} samples x {args.rounds} "
          "rounds, medians)")
    print(json.dumps({"benchmark": "loader_overhead", "ratio": round(longrecipe / contiguous, 3),
                      "goal": 0.9, "contiguous_samples_per_s": round(contiguous, 1),
                      "longrecipe_samples_per_s": round(longrecipe, 1),
                      "seq_length": args.seq_length, "target": args.target}))


if __name__ == "__main__":
    main()
