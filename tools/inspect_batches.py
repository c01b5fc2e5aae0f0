"""Dump what the training loader feeds the model, one JSON line per sample.

The command lives in ``megatron_ext/commands/inspect_batches.py`` (also installed as the console command
``megatron-inspect-batches``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.inspect_batches import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.inspect_batches import main

if __name__ == "__main__":
    sys.exit(main())
