"""Select long documents that need their long context: LADM attention scores, then a budget.

The command lives in ``megatron_ext/commands/ladm_select.py`` (also installed as the console command
``megatron-ladm-select``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.ladm_select import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.ladm_select import main

if __name__ == "__main__":
    sys.exit(main())
