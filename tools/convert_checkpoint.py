"""Convert checkpoints between Hugging Face folders and Megatron-Core (torch_dist) checkpoints.

The command lives in ``megatron_ext/commands/convert_checkpoint.py`` (also installed as the console command
``megatron-convert-checkpoint``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.convert_checkpoint import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
