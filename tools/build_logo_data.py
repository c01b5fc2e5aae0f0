"""Build LOGO preference rows from long-context QA rows with the policy model's own answers.

The command lives in ``megatron_ext/commands/build_logo_data.py`` (also installed as the console
command ``megatron-build-logo-data``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.build_logo_data import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.build_logo_data import main

if __name__ == "__main__":
    sys.exit(main())
