"""Tokenize preference JSONL (prompt or context + question, chosen, rejected) for LOGO training.

The command lives in ``megatron_ext/commands/preprocess_preference.py`` (also installed as the console command
``megatron-preprocess-preference``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.preprocess_preference import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.preprocess_preference import main

if __name__ == "__main__":
    sys.exit(main())
