"""Check that a parallel layout trains the same model as another, on your own training flags.

    python tools/verify_layout.py --layout-a tp=1 --layout-b tp=2,cp=2 --iterations 3 \
        <your megatron_ext.train flags, without the parallel sizes and --train-iters>

Runs both layouts for ``--iterations`` iterations on this machine's CPUs (torch.distributed.run,
gloo; world size tp*pp*cp*dp each) from the same initial weights: the layout-invariant
initialisation of ``--seed``, or the ``--load`` checkpoint both read (add ``--finetune`` when its
layout differs). Prints per iteration the loss and gradient norm of both runs and their relative
difference, the iteration-1 gradient difference of every parameter (||g_b - g_a|| / ||g_a||, in
global shape), PASS or FAIL against ``--tolerance``, and one JSON summary line. Exit status 0 when
everything is within tolerance, 1 when something is not, 2 for bad flags or a failed run.

Use a small model and sequence (a few layers, short --seq-length) with the features you train
with: the check is about the layout, not the size. Dropout draws different masks under different
layouts, so set --hidden-dropout 0 --attention-dropout 0 unless you want to see that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from megatron_ext.errors import UserError, report
from megatron_ext.verify.compare import (check_training_flags, compare, parse_layout,
                                         run_probe)

PROG = "verify_layout.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n")[0], allow_abbrev=False,
        epilog="Every other flag is passed to both runs as a megatron_ext.train flag.")
    parser.add_argument("--layout-a", default="tp=1", help="reference layout, e.g. 'tp=1'")
    parser.add_argument("--layout-b", required=True, help="layout to check, e.g. 'tp=2,cp=2'")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest relative difference that passes (losses, gradient norms, "
                             "per-parameter gradients)")
    parser.add_argument("--work-dir", default=None,
                        help="keep both runs' metrics and gradients here (default: a temporary "
                             "directory, removed at the end)")
    return parser


def print_report(a, b, result: dict, tolerance: float) -> None:
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(f"layout a: {a} ({a.world_size} ranks) | layout b: {b} ({b.world_size} ranks) | "
          f"tolerance {tolerance:g}")
    for r in result["iterations"]:
        print(f"{verdict(r['ok'])} iteration {r['iteration']}: loss {r['loss_a']:.8e} vs "
              f"{r['loss_b']:.8e} (rel {r['loss_rel_diff']:.2e}) | grad norm "
              f"{r['grad_norm_a']:.8e} vs {r['grad_norm_b']:.8e} "
              f"(rel {r['grad_norm_rel_diff']:.2e})")
    for name, diff in result["params"].items():
        print(f"{verdict(diff <= tolerance)} gradient {name}: rel {diff:.2e}")
    print(f"{verdict(result['passed'])} {len(result['params'])} parameters, largest gradient "
          f"difference {result['worst_param_rel_diff']:.2e} ({result['worst_param']})")


def main(argv=None) -> int:
    parser = build_parser()
    args, training_flags = parser.parse_known_args(argv)
    try:
        a, b = parse_layout(args.layout_a, "--layout-a"), parse_layout(args.layout_b, "--layout-b")
        if args.iterations < 1:
            raise UserError("--iterations must be >= 1")
        check_training_flags(training_flags)
        with tempfile.TemporaryDirectory(prefix="verify_layout_") as tmp:
            work = args.work_dir or tmp
            run_a = run_probe(a, training_flags, args.iterations, f"{work}/a")
            run_b = run_probe(b, training_flags, args.iterations, f"{work}/b")
    except UserError as err:
        return report(PROG, err)
    result = compare(run_a, run_b, args.tolerance)
    print_report(a, b, result, args.tolerance)
    summary = {"passed": result["passed"], "layout_a": str(a), "layout_b": str(b),
               "tolerance": args.tolerance, "iterations": result["iterations"],
               "worst_param": result["worst_param"],
               "worst_param_rel_diff": result["worst_param_rel_diff"]}
    print(json.dumps(summary), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
