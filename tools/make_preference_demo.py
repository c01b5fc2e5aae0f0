"""Write a small real-text preference JSONL (long-context sentence retrieval over Austen passages).

The command lives in ``megatron_ext/commands/make_preference_demo.py`` (also installed as the console command
``megatron-make-preference-demo``); this file keeps Megatron-LM's ``python tools/X.py`` habit.
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.commands.make_preference_demo import *  # noqa: F401,F403  (main, build_parser, ...)
from megatron_ext.commands.make_preference_demo import main

if __name__ == "__main__":
    sys.exit(main())
