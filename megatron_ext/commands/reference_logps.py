"""Compute a reference model's answer log-probs once, for DPO / IPO with --reference-logps.

Takes the training flags (the same parser as megatron_ext.train) plus --output; the reference
checkpoint is --load (weights only). Any TP / PP / CP / DP layout, launched like training:

    torchrun --nproc-per-node 2 tools/reference_logps.py --data-path data/pref_preference \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model HF_DIR --seq-length 8192 \\
        <architecture flags> --load REF_CKPT --context-parallel-size 2 \\
        --output data/pref_reference_logps.npz
"""

import json

from megatron_ext import arguments
from megatron_ext.errors import UserError, report

PROG = "reference_logps.py"


def main(argv=None) -> int:
    parser = arguments.build_parser(prog=PROG)
    g = parser.add_argument_group("reference log-probs")
    g.add_argument("--output", required=True, help="the .npz file to write")
    g.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if not args.load:
            raise arguments.ArgumentError("--load REF_CKPT is required: the reference model")
        # Scored at contiguous positions with the loss-independent forward pass; the training
        # loss flags do not apply here.
        args.preference_loss, args.reference_logps, args.dpo_label_smoothing = "logo", None, 0.0
        args.position_scheme, args.skip_train, args.eval_iters = "contiguous", True, 1
        cfg = arguments.finalize(args, arguments.launched_world_size())
        if cfg.objective.name != "preference":
            raise arguments.ArgumentError("--data-path must be preference data written by "
                                          "tools/preprocess_preference.py")
    except UserError as err:
        parser.error(str(err))
    from megatron_ext.objectives import reference_logps

    try:
        summary = reference_logps.compute(cfg, args.output, progress=not args.no_progress)
    except UserError as err:
        return report(PROG, err)
    if summary:
        print(json.dumps(summary))
    return 0
