"""One-screen summary of a training run directory (metrics.jsonl, checkpoints, TensorBoard).

The command lives in ``megatron_ext/commands/summarize_run.py`` (also installed as the console command
``megatron-summarize-run``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.summarize_run import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.summarize_run import main

if __name__ == "__main__":
    sys.exit(main())
