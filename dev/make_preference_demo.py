"""Write a small real-text preference JSONL (long-context sentence retrieval over Austen passages).

    python tools/make_preference_demo.py --output data/logo_demo.jsonl --num-rows 200
    python tools/preprocess_preference.py --input data/logo_demo.jsonl --output-prefix data/logo \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/hf_folder

Each row: "context" = --num-chunks shuffled passages of about --chunk-chars characters from the six
novels, "question" quotes one of their sentences and asks for the next one, "chosen" is that next
sentence and "rejected" --num-rejected wrong retrievals. Offline and deterministic from --seed.
"""

import argparse
import json
import os
import sys


from dev.demo_preference import make_preference_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the .jsonl file to write")
    p.add_argument("--num-rows", type=int, default=64)
    p.add_argument("--num-chunks", type=int, default=8, help="passages per context (K)")
    p.add_argument("--chunk-chars", type=int, default=2000,
                   help="characters per passage (about 4 per token)")
    p.add_argument("--num-rejected", type=int, default=2, help="rejected answers per row (M)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        rows = make_preference_rows(args.num_rows, args.num_chunks, args.chunk_chars,
                                    args.num_rejected, args.seed)
    except ValueError as err:
        print(f"make_preference_demo.py: error: {err}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(args.output + ".tmp", args.output)
    print(f"wrote {len(rows)} rows ({args.num_chunks} passages, {args.num_rejected} rejected "
          f"each) to {args.output}")
    return 0
