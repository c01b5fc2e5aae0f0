"""Build LOGO preference rows from long-context QA rows with the policy model's own answers.

    python tools/build_logo_data.py --input qa.jsonl --output data/logo.jsonl \
        --model path/to/hf_folder [--chunk-tokens 1024] [--num-chunks 16] [--min-overlap 3] \
        [--score-with-answer] [--judge-model path/to/hf_folder]
    python tools/preprocess_preference.py --input data/logo.jsonl --output-prefix data/logo \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/hf_folder

Input rows: {"context": str, "question": str, "answer": str} (JSON lines; a .json array or a
.parquet file needs the `datasets` package). The context is cut into --chunk-tokens token chunks,
scored by feature overlap with the question (and the gold answer with --score-with-answer); the
top --num-chunks (K) are kept. The model answers greedily with all K chunks (chosen), with the top
K/2 and with the bottom K/2 of them (the two rejected answers), chunks in document order. Output
rows {"context": [K chunks], "question", "chosen", "rejected": [2 answers], ...} are appended one
per line; rerunning the same command resumes. Dropped rows go to <stem>.dropped.jsonl, counts to
<stem>.summary.json.
"""

import argparse
import json

from megatron_ext.errors import UserError, report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="QA rows: .jsonl (or .json array / .parquet with `datasets`)")
    p.add_argument("--output", required=True,
                   help="preference rows (.jsonl, appended to; rerun to resume)")
    p.add_argument("--model", required=True,
                   help="Hugging Face causal LM folder: the tokenizer for chunking and the "
                        "policy that writes the answers")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per context chunk")
    p.add_argument("--num-chunks", type=int, default=16,
                   help="K: chunks kept per row (>= 2; LOGO's experiments: 16)")
    p.add_argument("--min-overlap", type=int, default=3,
                   help="drop a row whose overlap (see --overlap-rule) is below this")
    p.add_argument("--overlap-rule", choices=["best", "all-kept"], default="best",
                   help="'best': the best kept chunk must reach --min-overlap; 'all-kept': every "
                        "kept chunk must (the released LOGO rule)")
    p.add_argument("--score-with-answer", action="store_true",
                   help="score chunks against the question AND the gold answer (as LOGO does); "
                        "default: the question only")
    p.add_argument("--features", choices=["auto", "spacy", "lexical"], default="auto",
                   help="chunk features: spaCy lemmas/entities, or the lexical fallback; auto: "
                        "spaCy when it and --spacy-model are installed")
    p.add_argument("--spacy-model", default="en_core_web_lg")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per generated answer")
    p.add_argument("--batch-size", type=int, default=4,
                   help="input rows per generation batch (3 prompts each)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="prompt with plain 'User: ... Assistant: ' text even if the tokenizer "
                        "has a chat template")
    p.add_argument("--judge-model", default=None,
                   help="HF folder (may be --model) judging each answer correct/incorrect "
                        "against the gold answer; keep rows whose chosen answer is correct and "
                        "both rejected answers incorrect")
    p.add_argument("--keep-identical", action="store_true",
                   help="keep rows where a rejected answer equals the chosen one (dropped by "
                        "default: nothing to prefer)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="count bad input rows per reason and skip them instead of stopping")
    p.add_argument("--max-rows", type=int, default=None,
                   help="read only the first N input rows")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_ext.data.logo_builder import BuildOptions, build_logo_data

    options = BuildOptions(
        model=args.model, chunk_tokens=args.chunk_tokens, num_chunks=args.num_chunks,
        min_overlap=args.min_overlap, overlap_rule=args.overlap_rule,
        score_with_answer=args.score_with_answer, features=args.features,
        spacy_model=args.spacy_model, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, chat_template=not args.no_chat_template,
        judge_model=args.judge_model, keep_identical=args.keep_identical,
        skip_bad_rows=args.skip_bad_rows, max_rows=args.max_rows, dtype=args.dtype,
        device=args.device, progress=not args.no_progress)
    try:
        summary = build_logo_data(args.input, args.output, options)
    except UserError as err:
        return report(parser.prog, err)
    print(json.dumps(summary, indent=2))
    print(f"kept {summary['kept']} rows in {args.output}; dropped "
          f"{sum(summary['dropped'].values())}, skipped {sum(summary['skipped_bad_rows'].values())}"
          " bad rows")
    return 0

