"""Weighted average of checkpoints (LongRecipe stage 2), keeping the FIRST input's config.

    python tools/merge_checkpoints.py --inputs extended_hf/ original_hf/ --weights 0.5 0.5 \
        --output merged_hf/
    python tools/merge_checkpoints.py --inputs run/ckpt converted/base --weights 0.5 0.5 \
        --output merged/            # megatron_ext checkpoints -> a 'release' checkpoint

Inputs are all HF folders (safetensors) or all megatron_ext torch_dist checkpoints. Parameters are
averaged in fp32 and saved in the first input's dtype (or --dtype). Put the context-extended model
first: its config.json / model_args.json (RoPE base, max positions), tokenizer and generation config
are kept.
"""

import argparse
import sys


from megatron_ext.checkpoints.merge import DTYPES, MergeError, merge_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True,
                   help="two or more checkpoints; the first one's config is kept")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per input (default: equal weights); a warning is printed "
                        "when they do not sum to 1")
    p.add_argument("--output", required=True, help="directory to write (must not exist or be "
                                                   "empty, unless --overwrite)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the merged floating-point tensors (default: the first input's)")
    p.add_argument("--max-shard-size", default="5GB", help="HF output: safetensors shard size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def warn(message: str) -> None:
        print(f"merge_checkpoints.py: warning: {message}", file=sys.stderr, flush=True)

    try:
        summary = merge_checkpoints(args.inputs, args.output, args.weights, args.dtype,
                                    args.max_shard_size, args.overwrite,
                                    progress=not args.no_progress, warn=warn)
    except MergeError as err:
        print(f"merge_checkpoints.py: error: {err}", file=sys.stderr)
        return 2
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    weights = " + ".join(f"{w:g} x {p}" for w, p in zip(summary["weights"], summary["inputs"]))
    print(f"wrote {summary['output']} ({summary['kind']}, {summary['tensors']} tensors): "
          f"{weights}")
    return 0
