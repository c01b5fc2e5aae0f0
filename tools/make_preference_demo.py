"""Write a small real-text preference JSONL (long-context sentence retrieval over Austen passages).

Demo data, so the command lives with the other development helpers in
``dev/make_preference_demo.py`` (not installed with the package).
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext and dev importable from a source checkout)

from dev.make_preference_demo import *  # noqa: F401,F403  (main, build_parser, ...)
from dev.make_preference_demo import main

if __name__ == "__main__":
    sys.exit(main())
