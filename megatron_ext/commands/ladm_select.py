"""Select long documents that need their long context: LADM attention scores, then a budget.

    python tools/ladm_select.py score --model HF_DIR --input docs.jsonl --output scores.jsonl \
        [--domain-key meta.pile_set_name] [--seq-length 32768] [--span 128] [--variant code]
    python tools/ladm_select.py select --scores scores.jsonl --input docs.jsonl \
        --budget-tokens 1000000000 --output selected.jsonl [--global-top-k]

`score` writes one JSON line per document (id, domain, length, num_tokens, score, cds,
layer_cds, settings). Only exact --seq-length prefixes are scored (scores at different lengths do
not compare); shorter documents get score null with the reason in `unscorable` and are counted,
unless --score-short-documents scores them at their own length. Rerunning the same command
resumes: ids already in --output are skipped. Shard a corpus over machines or GPUs with
--num-shards K --shard-index i (one --output per shard). `select` takes the same top p% of every
domain (the smallest integer p whose tokens reach the budget), or with --global-top-k the top
documents overall, and writes the chosen input rows plus <output>.summary.json and
<output>.hist.png.
"""

import argparse
import json
import os
import sys

from megatron_ext import errors
from megatron_ext.selection.ladm.scores_io import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    sc = sub.add_parser("score", help="score every document of a JSON-lines file",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sc.add_argument("--model", required=True, help="Hugging Face causal LM folder (Llama family)")
    sc.add_argument("--input", required=True, help="JSON lines with 'text' or 'input_ids' rows")
    sc.add_argument("--output", required=True, help="score file (appended to; resumable)")
    sc.add_argument("--text-key", default="text", help="field holding the document text")
    sc.add_argument("--domain-key", default=None,
                    help="dotted path of the domain field, e.g. meta.pile_set_name")
    sc.add_argument("--id-key", default="id",
                    help="document id field (rows without it get id line<N>)")
    sc.add_argument("--scorer", choices=["ladm-cds", "prolong-delta-ppl"], default="ladm-cds",
                    help="LADM contextual dependency score, or ProLong's delta perplexity")
    sc.add_argument("--seq-length", type=int, default=32768,
                    help="score each document's first N tokens; shorter documents get score "
                         "null (see --score-short-documents)")
    sc.add_argument("--score-short-documents", action="store_true",
                    help="also score documents shorter than --seq-length, at their own length "
                         "(not comparable with full-length scores; `select` warns)")
    sc.add_argument("--span", type=int, default=128, help="tokens per span (segment)")
    sc.add_argument("--d-afs", type=int, default=4, help="key-span stride, in spans")
    sc.add_argument("--d-cds", type=int, default=4, help="query-span stride, in spans")
    sc.add_argument("--sink-spans", type=int, default=1,
                    help="first spans left out of the PFS list (attention sink)")
    sc.add_argument("--variant", choices=["code", "paper"], default="code",
                    help="'code': the released scorer; 'paper': the paper's sums and exclusions")
    sc.add_argument("--first-span", type=int, default=16,
                    help="paper variant only: first query span n0")
    sc.add_argument("--local-spans", type=int, default=4,
                    help="paper variant only: most recent spans excluded from the PFS list")
    sc.add_argument("--no-std-weight", action="store_true",
                    help="ablation (ladm-cds only): drop the std factor of each AFS "
                         "(the released 'no_std')")
    sc.add_argument("--no-length-weight", action="store_true",
                    help="ablation (ladm-cds only): drop the distance and position weights "
                         "(the released 'no_len_weight')")
    sc.add_argument("--prolong-pairs", type=int, default=500,
                    help="prolong-delta-ppl only: segment pairs sampled per document")
    sc.add_argument("--prolong-threshold", type=float, default=0.1,
                    help="prolong-delta-ppl only: delta-perplexity threshold")
    sc.add_argument("--seed", type=int, default=11, help="prolong-delta-ppl only: pair sampling")
    sc.add_argument("--batch-size", type=int, default=1, help="documents per forward pass")
    sc.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="model dtype (auto: bf16 on GPU, fp32 on CPU); the probe is always fp32")
    sc.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    sc.add_argument("--num-shards", type=int, default=1,
                    help="split the input row-wise into K shards (one run and --output each)")
    sc.add_argument("--shard-index", type=int, default=0,
                    help="this run's shard: rows i, i+K, i+2K, ...")
    sc.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

    se = sub.add_parser("select", help="choose documents under a token budget",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    se.add_argument("--scores", required=True, nargs="+", help="score file(s), e.g. all shards")
    se.add_argument("--input", required=True, help="the JSON-lines file that was scored")
    se.add_argument("--budget-tokens", type=int, required=True)
    se.add_argument("--output", required=True, help="selected input rows (JSON lines)")
    rule = se.add_mutually_exclusive_group()
    # --per-domain only spells out the default (kept for scripts that pass it); SUPPRESS keeps
    # the help from printing a misleading "(default: False)"
    rule.add_argument("--per-domain", action="store_true", default=argparse.SUPPRESS,
                      help="the default: the same top p%% of every domain (by document count, "
                           "the smallest integer p reaching the budget); domains come from the "
                           "score rows (score --domain-key); rows without one form one domain")
    rule.add_argument("--global-top-k", action="store_true",
                      help="instead, the top documents overall, ignoring domains")
    se.add_argument("--count-tokens", choices=["document", "scored"], default="document",
                    help="budget counts full documents (as released) or only scored prefixes")
    se.add_argument("--id-key", default="id", help="must match the one used for `score`")
    return p


def run_score(args) -> int:
    from megatron_ext.selection.ladm.delta_ppl import ProlongSettings
    from megatron_ext.selection.ladm.loading import build_scorer, load_tokenizer, model_vocab_size
    from megatron_ext.selection.ladm.pipeline import (ScoreOptions, check_tokenizer, prepare_run,
                                            score_file)
    from megatron_ext.selection.ladm.scoring import CdsSettings, min_scorable_length

    options = ScoreOptions(args.text_key, args.domain_key, args.id_key, args.seq_length,
                           args.batch_size, args.num_shards, args.shard_index,
                           os.path.abspath(args.model), not args.no_progress,
                           args.score_short_documents)
    refuse_ablations_without_cds(args)
    try:
        if args.scorer == "ladm-cds":
            settings = CdsSettings(args.variant, args.span, args.d_afs, args.d_cds,
                                   args.sink_spans, args.first_span, args.local_spans,
                                   std_weight=not args.no_std_weight,
                                   length_weight=not args.no_length_weight)
            needed = min_scorable_length(settings)
        else:
            settings = ProlongSettings(args.span, args.seq_length, args.prolong_pairs,
                                       args.prolong_threshold, args.seed)
            needed = 2 * args.span
    except ValueError as err:
        raise InputError(f"bad scorer settings: {err}") from None
    if needed > args.seq_length:
        raise InputError(f"--seq-length {args.seq_length} is shorter than the {needed} tokens "
                         "these settings need to score anything; raise it or lower --span")
    # Everything that can be wrong with the input or the output file fails before the model loads.
    vocab_size = model_vocab_size(args.model, args.seq_length)
    run = prepare_run(settings.record(), args.input, args.output, options, vocab_size)
    tokenizer = load_tokenizer(args.model) if run.scan.text_rows else None
    check_tokenizer(run, tokenizer)
    report = score_file(build_scorer(settings, args.model, args.dtype, args.device), tokenizer,
                        run)
    for line in report.lines():
        print(line)
    return 0


def refuse_ablations_without_cds(args) -> None:
    ablations = [flag for flag, on in (("--no-std-weight", args.no_std_weight),
                                       ("--no-length-weight", args.no_length_weight)) if on]
    if ablations and args.scorer != "ladm-cds":
        raise InputError(f"{', '.join(ablations)} ablate the LADM score's weights; --scorer "
                         f"{args.scorer} has none (use --scorer ladm-cds)")


def run_select(args) -> int:
    from megatron_ext.selection.ladm import selection

    if args.budget_tokens < 1:
        raise InputError(f"--budget-tokens must be >= 1, got {args.budget_tokens}")
    if not os.path.isfile(args.input):  # before reading the (possibly many) score files
        raise InputError(f"--input {args.input}: no such file")
    table = selection.load_scores(args.scores, args.count_tokens)
    if not table.docs:
        reasons = "; ".join(f"{n} x {why}" for why, n in sorted(table.unscored.items()))
        raise InputError(f"--scores {' '.join(args.scores)}: no scored documents "
                         f"({table.unscorable} rows with score null: {reasons or 'none'})")
    warn_about_scores(table, per_domain=not args.global_top_k)
    pick = selection.select_global if args.global_top_k else selection.select_per_domain
    chosen = pick(table.docs, args.budget_tokens)
    written = selection.write_selected(args.input, args.id_key, chosen, args.output)
    summary = selection.summarize(table, chosen, args.count_tokens)
    stem = os.path.splitext(args.output)[0]
    png = stem + ".hist.png"
    summary["histogram_png"] = png if selection.write_histogram_png(summary, png) else None
    with open(stem + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print_selection(args, table, chosen, written, summary)
    print(f"summary: {stem}.summary.json")
    return 0


def warn_about_scores(table, per_domain: bool) -> None:
    """Say on stderr what could make the ranking misleading; never stop the selection."""
    from megatron_ext.selection.ladm.selection import mixed_length_warning

    mixed = mixed_length_warning(table)
    if mixed:
        print(mixed, file=sys.stderr)
    if len(table.settings) > 1:
        print(f"warning: the score files mix {len(table.settings)} settings; scores may not be "
              "comparable", file=sys.stderr)
    if per_domain and table.without_domain == len(table.docs):
        print("warning: no score row has a domain (was `score` run without --domain-key?); "
              "per-domain selection treats all documents as one domain", file=sys.stderr)
    elif per_domain and table.without_domain:
        print(f"warning: {table.without_domain} scored rows have no domain; they are selected "
              "as one more domain, '(none)'", file=sys.stderr)


def print_selection(args, table, chosen, written: int, summary: dict) -> None:
    rule = (f"global top {len(chosen.docs)}" if args.global_top_k
            else f"top {chosen.percentile}% of every domain")
    print(f"selected {written} documents, {chosen.tokens} tokens ({args.count_tokens} rule), "
          f"{rule}; budget {args.budget_tokens} " +
          ("reached" if chosen.reached else "NOT reached: the whole pool is smaller"))
    print(f"{'domain':<24} {'pool docs':>10} {'selected':>10} {'selected tokens':>16}")
    for name, d in summary["domains"].items():
        print(f"{name[:24]:<24} {d['pool_docs']:>10} {d['selected_docs']:>10} "
              f"{d['selected_tokens']:>16}")
    for reason, count in sorted(table.unscored.items()):
        print(f"ignored {count} rows with score null: {reason}")
    if table.duplicates:
        print(f"ignored {table.duplicates} exact duplicate rows")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_score(args) if args.command == "score" else run_select(args)
    except errors.UserError as err:
        return errors.report(f"ladm_select.py {args.command}", err)
