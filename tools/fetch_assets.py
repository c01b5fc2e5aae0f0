"""Fetch the offline assets into the cache and print where they are.

    python tools/fetch_assets.py [--all] [--tokenizer] [--corpora] [--smollm2] [--botchan]

Without flags: tokenizer + corpora. The cache is $MEGATRON_EXT_CACHE or
~/.cache/megatron_ext (see dev/assets.py).
"""

import argparse
import sys

import _bootstrap  # noqa: F401

from dev import assets


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every asset below")
    parser.add_argument("--tokenizer", action="store_true", help="Mistral SentencePiece model")
    parser.add_argument("--corpora", action="store_true", help="Austen + Python stdlib JSONL")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct HF folder")
    parser.add_argument("--botchan", action="store_true", help="botchan.txt + toy SPM model")
    args = parser.parse_args(argv)
    if not (args.all or args.tokenizer or args.corpora or args.smollm2 or args.botchan):
        args.tokenizer = args.corpora = True
    if args.all:
        args.tokenizer = args.corpora = args.smollm2 = args.botchan = True
    return args


def selected_fetchers(args: argparse.Namespace) -> list:
    fetchers = []
    if args.tokenizer:
        fetchers.append(("mistral tokenizer.model", assets.mistral_sentencepiece_model))
    if args.corpora:
        fetchers.append(("austen novels", assets.austen_novels))
        for name in assets.CORPORA:
            fetchers.append((f"{name} jsonl", lambda name=name: assets.corpus_jsonl(name)))
    if args.smollm2:
        fetchers.append(("smollm2 HF folder", assets.smollm2_hf_dir))
    if args.botchan:
        fetchers.append(("botchan", assets.botchan_text))
    return fetchers


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"cache: {assets.cache_dir()}")
    failures = 0
    for label, fetch in selected_fetchers(args):
        try:
            print(f"{label}: {fetch()}", flush=True)
        except assets.AssetUnavailable as exc:
            failures += 1
            print(f"{label}: UNAVAILABLE: {exc}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
