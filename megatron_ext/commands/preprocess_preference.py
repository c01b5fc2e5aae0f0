"""Tokenize preference JSONL (prompt or context + question, chosen, rejected) for LOGO training.

    python tools/preprocess_preference.py --input pairs.jsonl --output-prefix data/logo \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/hf_folder

writes data/logo_preference_document.{bin,idx} (one document per row: prompt, chosen, rejected
1..M), its _tokenflags.{bin,idx} (prompt segment ends, answer targets) and _meta.json; pass
data/logo_preference_document to --data-path. Accepted rows:
  {"prompt": str, "chosen": str, "rejected": [str, ...] or str}
  {"context": str or [str, ...], "question": str, "chosen": str, "rejected": [str, ...] or str}
  TRL conversational rows ("prompt" a list of messages, answers [{"role": "assistant", ...}]),
each with an optional "system" string. A string context is cut into --context-chunk-tokens chunks;
a list context keeps one chunk per item.
"""

import argparse
import sys


from megatron_ext.data.preprocess_preference import preprocess_preference


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="one or more .jsonl files")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", required=True,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--no-chat-template", action="store_true",
                   help="render prompts as plain 'Role: content' blocks and end answers with EOD "
                        "instead of using the tokenizer's chat template")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="count bad rows per reason and skip them instead of stopping")
    p.add_argument("--context-chunk-tokens", type=int, default=1024,
                   help="cut a string 'context' into chunks of this many tokens (the units LOGO "
                        "position synthesis moves apart)")
    p.add_argument("--max-answer-tokens", type=int, default=2048,
                   help="a longer chosen or rejected answer is a bad row")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="a longer prompt is a bad row (default: no limit)")
    args = p.parse_args(argv)
    try:
        stats = preprocess_preference(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            chat_template=not args.no_chat_template, workers=args.workers,
            skip_bad_rows=args.skip_bad_rows, context_chunk_tokens=args.context_chunk_tokens,
            max_answer_tokens=args.max_answer_tokens, max_prompt_tokens=args.max_prompt_tokens)
    except (FileNotFoundError, ValueError) as err:  # BadPreferenceRow is a ValueError
        print(f"preprocess_preference.py: error: {err}", file=sys.stderr)
        return 2
    print(stats.summary())
    print(f"wrote {stats.data_prefix}.bin / .idx; pass --data-path {stats.data_prefix}")
    return 0
