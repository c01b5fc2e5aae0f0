"""Check that a parallel layout trains the same model as another (losses, grad norms, gradients).

The command lives in ``megatron_ext/commands/verify_layout.py`` (also installed as the console command
``megatron-verify-layout``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.verify_layout import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.verify_layout import main

if __name__ == "__main__":
    sys.exit(main())
