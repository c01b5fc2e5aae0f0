"""Static RoPE base for context extension: the dynamic-NTK formula evaluated once at the target.

    python tools/rope_base.py --rotary-base 500000 --original-seq-length 8192 \
        --target-seq-length 81920 --head-dim 128                      # -> 48.9M (factor 10)
    python tools/rope_base.py --hf-config SmolLM2/ --target-seq-length 32768
    python tools/rope_base.py --hf-config Qwen2.5-7B/ --target-seq-length 131072 --yarn
                                                                      # -> YaRN factor 4

base' = base * ((factor * T / L) - (factor - 1)) ** (d / (d - 2)), factor defaulting to T / L.
With --yarn: YaRN's factor T / L instead (the base stays), and its flags.
Prints the base and the megatron_ext.train flags to use. Dynamic RoPE scaling recomputes the base
from each batch's largest position id, which skip-wise positions (PoSE, LongRecipe) change per
sample: train and serve with this fixed base instead.
"""

import argparse
import json
import sys


from megatron_ext.model.rope_base import (RopeBaseError, megatron_flags, ntk_rope_base,
                                          read_hf_rope_settings, yarn_factor,
                                          yarn_hf_rope_parameters, yarn_megatron_flags)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config", default=None,
                   help="HF folder or config.json: reads the base (rope_theta), the rotary head "
                        "dim and the original context (max_position_embeddings); the flags below "
                        "override what it says")
    p.add_argument("--rotary-base", type=float, default=None, help="the model's RoPE base (theta)")
    p.add_argument("--original-seq-length", type=int, default=None,
                   help="context the model was trained for (L)")
    p.add_argument("--target-seq-length", type=int, required=True,
                   help="context to extend to (T); becomes --max-position-embeddings")
    p.add_argument("--factor", type=float, default=None,
                   help="dynamic-NTK scaling factor (default T / L, as in LongRecipe's table)")
    p.add_argument("--head-dim", type=int, default=None, help="rotary dimension per head (d)")
    p.add_argument("--yarn", action="store_true",
                   help="YaRN instead of a new base: factor T / L over the model's own base "
                        "(no --head-dim needed; --factor is refused)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    notes = []
    try:
        base, head_dim, original = args.rotary_base, args.head_dim, args.original_seq_length
        if args.hf_config:
            found = read_hf_rope_settings(args.hf_config)
            notes += list(found.notes)
            base = found.rotary_base if base is None else base
            head_dim = found.head_dim if head_dim is None else head_dim
            original = found.original_seq_length if original is None else original
        needed = (("--rotary-base", base), ("--original-seq-length", original)) + (
            () if args.yarn else (("--head-dim", head_dim),))
        missing = [flag for flag, value in needed if value is None]
        if missing:
            raise RopeBaseError(f"missing {', '.join(missing)} (give them, or --hf-config)")
        if args.yarn:
            if args.factor is not None:
                raise RopeBaseError("--factor is the dynamic-NTK factor; --yarn computes YaRN's "
                                    "factor from the lengths: drop --factor")
            return _print_yarn(args, base, original, notes)
        factor = args.factor if args.factor is not None else args.target_seq_length / original
        new_base = ntk_rope_base(base, original, args.target_seq_length, head_dim, factor)
    except RopeBaseError as err:
        print(f"rope_base.py: error: {err}", file=sys.stderr)
        return 2
    flags = megatron_flags(new_base, args.target_seq_length)
    if args.json:
        print(json.dumps({"rotary_base": new_base, "original_rotary_base": base,
                          "head_dim": head_dim, "original_seq_length": original,
                          "target_seq_length": args.target_seq_length, "factor": factor,
                          "megatron_flags": flags, "notes": notes}))
        return 0
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"rotary base {base:g} -> {new_base:.1f} (L={original}, T={args.target_seq_length}, "
          f"factor={factor:g}, head dim {head_dim})")
    print(f"megatron_ext.train flags: {' '.join(flags)}")
    print(f"HF config.json: rope_theta={new_base:.1f}, max_position_embeddings="
          f"{args.target_seq_length}, no rope_scaling")
    print("warning: use this fixed base; do not use dynamic RoPE scaling (or add "
          "--use-rope-scaling / --rotary-seq-len-interpolation-factor) with skip-wise positions "
          "(--position-scheme pose|longrecipe): dynamic scaling recomputes the base from each "
          "batch's largest position id, so every sample would be rotated differently",
          file=sys.stderr)
    return 0


def _print_yarn(args, base: float, original: int, notes: list) -> int:
    factor = yarn_factor(original, args.target_seq_length)
    flags = yarn_megatron_flags(factor, original, args.target_seq_length)
    hf = yarn_hf_rope_parameters(base, factor, original)
    # read_hf_rope_settings' "replace the scaling" note is about a new base, not YaRN.
    notes = [note for note in notes if "static base replaces" not in note]
    if args.json:
        print(json.dumps({"yarn_factor": factor, "rotary_base": base,
                          "original_seq_length": original,
                          "target_seq_length": args.target_seq_length,
                          "megatron_flags": flags, "hf_rope_parameters": hf, "notes": notes}))
        return 0
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"YaRN factor {factor:g} (L={original}, T={args.target_seq_length}, base {base:g} kept)")
    print(f"megatron_ext.train flags: {' '.join(flags)}")
    print(f"HF config.json: rope_parameters={json.dumps(hf)}, max_position_embeddings="
          f"{args.target_seq_length}")
    return 0
