"""Static RoPE base for context extension: the dynamic-NTK formula evaluated once at the target.

The command lives in ``megatron_ext/commands/rope_base.py`` (also installed as the console command
``megatron-rope-base``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.rope_base import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.rope_base import main

if __name__ == "__main__":
    sys.exit(main())
