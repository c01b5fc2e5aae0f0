"""``python -m megatron_ext.evaluate``: see megatron_ext/evaluate/cli.py."""

import sys

from megatron_ext.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
