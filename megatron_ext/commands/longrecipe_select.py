"""LongRecipe impactful-token analysis and sentence selection.

    # which token classes does context extension change most? (JSON report + PNG chart)
    python tools/longrecipe_select.py analyze --base-model SmolLM2/ --extended-model SmolLM2-32k/ \
        --input docs.jsonl --max-tokens 4096 --num-docs 32 --output report.json

    # short samples for long windows: impactful sentences + a random share of the rest
    python tools/longrecipe_select.py select --input docs.jsonl --output selected.jsonl \
        --keep-classes numerals --budget-ratio 0.3 --target-seq-length 32768 \
        --tokenizer-model SmolLM2/
    python tools/preprocess_data.py --input selected.jsonl --output-prefix data/selected \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model SmolLM2/ --append-eod
"""

import argparse
import json
import os
import sys


from megatron_ext.dtypes import dtype_name
from megatron_ext.selection.longrecipe import token_classes as tc


def _segment_unit(text: str) -> str:
    unit = {"sentences": "sentence", "lines": "line"}.get(text, text)
    if unit not in ("sentence", "line"):
        raise argparse.ArgumentTypeError(f"{text!r}: use sentence or line")
    return unit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="per-token logit change between two models, by class")
    a.add_argument("--base-model", required=True, help="HF folder of the original model")
    a.add_argument("--extended-model", required=True,
                   help="HF folder of the context-extended model (same tokenizer)")
    a.add_argument("--input", required=True, help="jsonl documents")
    a.add_argument("--text-key", default="text")
    a.add_argument("--max-tokens", type=int, default=2048,
                   help="tokens read from the start of each document")
    a.add_argument("--num-docs", type=int, default=16, help="documents analysed (the first ones)")
    a.add_argument("--top-fraction", type=float, default=0.2,
                   help="share of tokens kept per position bucket (the paper: 0.2)")
    a.add_argument("--position-bucket", type=int, default=None,
                   help="positions per ranking bucket (default ceil(50 / documents), 1 = per "
                        "index as in the paper once there are >= 50 documents)")
    a.add_argument("--dtype", type=dtype_name, default="fp32",
                   help="fp32, bf16 or fp16 (float32, bfloat16, float16 accepted)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--spacy-model", default="en_core_web_sm",
                   help="spaCy pipeline for part-of-speech tags, used when spaCy is installed")
    a.add_argument("--output", required=True,
                   help="report .json; the chart is written next to it as .png")

    s = sub.add_parser("select", help="keep impactful sentences up to a token budget")
    s.add_argument("--input", required=True, help="jsonl documents")
    s.add_argument("--output", required=True, help="jsonl samples (text + metadata)")
    s.add_argument("--text-key", default="text")
    s.add_argument("--id-key", default="id", help="field naming the source document")
    s.add_argument("--keep-classes", default=tc.NUMERALS,
                   help=f"comma-separated word classes that make a sentence impactful: "
                        f"{', '.join(tc.WORD_CLASSES)} (default: numerals, as the paper found)")
    s.add_argument("--budget-ratio", type=float, default=0.3,
                   help="tokens per sample = round(ratio x --target-seq-length)")
    s.add_argument("--target-seq-length", type=int, required=True,
                   help="target context T; each T-token window of a document gives one sample")
    s.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   choices=["HuggingFaceTokenizer", "SentencePieceTokenizer"])
    s.add_argument("--tokenizer-model", required=True,
                   help="the tokenizer tools/preprocess_data.py will use (HF folder or .model)")
    s.add_argument("--segment-unit", "--segment-by", dest="segment_unit", type=_segment_unit,
                   default="sentence",
                   help="sentence, or line for code (as tools/preprocess_data.py's "
                        "--segment-unit; --segment-by sentences|lines is the former spelling)")
    s.add_argument("--wrapped-lines", action="store_true",
                   help="text with hard line breaks (books): a single newline does not end a "
                        "sentence, a blank line does")
    s.add_argument("--seed", type=int, default=1234)
    for parser in (a, s):
        parser.add_argument("--no-progress", action="store_true")
    return p


def run_analyze(args) -> int:
    from megatron_ext.selection.longrecipe import impactful_tokens as it

    report = it.analyze(args.base_model, args.extended_model, args.input, args.text_key,
                        args.max_tokens, args.num_docs, args.top_fraction, args.position_bucket,
                        args.dtype, args.device, args.spacy_model,
                        progress=not args.no_progress)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    stem = os.path.splitext(args.output)[0]
    chart = it.draw_chart(report["classes"], stem + ".png",
                          f"top {args.top_fraction:.0%} tokens by logit change per position vs "
                          f"all tokens ({report['scored_tokens']} tokens)")
    report["chart"] = chart
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    print(f"{len(report['documents'])} documents, {report['scored_tokens']} tokens scored, top "
          f"{args.top_fraction:g} per bucket of {report['position_bucket_width']} positions "
          f"({report['top_tokens']} tokens); mean delta {report['delta']['mean']:.3f}")
    print(it.format_table(report["classes"]))
    if report["pos"]["available"]:
        print("part of speech:")
        print(it.format_table(report["pos"]["classes"]))
    else:
        print(f"note: {report['pos']['reason']}", file=sys.stderr)
    for note in report["notes"]:
        print(f"warning: {note}", file=sys.stderr)
    skipped = report["skipped_documents"]
    if any(skipped.values()):
        print(f"note: skipped documents: {skipped}", file=sys.stderr)
    print(f"wrote {args.output}" + (f" and {chart}" if chart else
                                    " (no chart: Pillow is not installed)"))
    return 0


def run_select(args) -> int:
    from megatron_ext.selection.longrecipe import sentence_selection as ss

    # The selector checks its flags first; the tokenizer (seconds to load) comes after.
    selector = ss.SentenceSelector(None, args.target_seq_length, args.budget_ratio,
                                   ss.parse_classes(args.keep_classes), args.segment_unit,
                                   args.wrapped_lines, args.seed)
    selector.tokenize = ss.tokenizer_counter(args.tokenizer_type, args.tokenizer_model)
    stats = ss.select_file(args.input, args.output, selector, args.text_key, args.id_key,
                           progress=not args.no_progress)
    print(f"budget {selector.budget} tokens per sample (round({args.budget_ratio:g} x "
          f"{args.target_seq_length})), keep classes: {args.keep_classes}")
    print(stats.summary())
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ext.selection.longrecipe.impactful_tokens import AnalysisError
    from megatron_ext.selection.longrecipe.sentence_selection import SelectionError

    try:
        return run_analyze(args) if args.command == "analyze" else run_select(args)
    except (AnalysisError, SelectionError) as err:
        print(f"longrecipe_select.py {args.command}: error: {err}", file=sys.stderr)
        return 2
