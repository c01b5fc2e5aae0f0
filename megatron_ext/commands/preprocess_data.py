"""Tokenize JSONL into Megatron IndexedDataset files (Megatron-LM's flags).

    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/books \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --append-eod

writes data/books_text_document.{bin,idx}; pass that prefix to --data-path. Alongside it go
data/books_text_document_tokenflags.{bin,idx} (sentence or line ends, document ends, SFT targets)
and data/books_text_document_meta.json, which the loader reads for LongRecipe positions, packed
documents and SFT. A --json-keys field holding chat messages ([{"role", "content"}, ...]) is
rendered with the tokenizer's chat template; only assistant tokens become training targets.
"""

import argparse
import sys


from megatron_ext.data.preprocess import MalformedRow, preprocess


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="one or more .jsonl files")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="fields to tokenize (dotted paths reach nested fields)")
    p.add_argument("--tokenizer-type", required=True,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-malformed", action="store_true",
                   help="count and skip rows that are not JSON objects with the --json-keys strings")
    p.add_argument("--segment-unit", choices=["sentence", "line"], default="sentence",
                   help="segments for --position-scheme longrecipe: sentences (. ! ? and newlines) "
                        "for prose, lines for code")
    p.add_argument("--no-chat-template", action="store_true",
                   help="render chat messages as plain 'Role: content' blocks instead of the "
                        "tokenizer's chat template")
    args = p.parse_args(argv)
    try:
        stats = preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                           json_keys=args.json_keys, append_eod=args.append_eod,
                           workers=args.workers, skip_malformed=args.skip_malformed,
                           segment_unit=args.segment_unit,
                           chat_template=not args.no_chat_template)
    except (MalformedRow, FileNotFoundError, ValueError) as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    print(stats.summary())
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin / .idx")
    return 0
