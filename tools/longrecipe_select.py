"""LongRecipe impactful-token analysis and sentence selection.

The command lives in ``megatron_ext/commands/longrecipe_select.py`` (also installed as the console command
``megatron-longrecipe-select``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.longrecipe_select import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.longrecipe_select import main

if __name__ == "__main__":
    sys.exit(main())
