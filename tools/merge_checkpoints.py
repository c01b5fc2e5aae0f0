"""Weighted average of checkpoints (LongRecipe stage 2), keeping the FIRST input's config.

The command lives in ``megatron_ext/commands/merge_checkpoints.py`` (also installed as the console command
``megatron-merge-checkpoints``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.merge_checkpoints import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.merge_checkpoints import main

if __name__ == "__main__":
    sys.exit(main())
