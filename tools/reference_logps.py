"""Compute a reference model's answer log-probs once, for DPO / IPO (--reference-logps).

The command lives in ``megatron_ext/commands/reference_logps.py`` (also installed as the console
command ``megatron-reference-logps``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.reference_logps import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.reference_logps import main

if __name__ == "__main__":
    sys.exit(main())
