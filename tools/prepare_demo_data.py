"""Fetch the offline demo assets and tokenize them once; prints DATA_PATH=... and TOKENIZER_MODEL=...

    eval "$(python tools/prepare_demo_data.py)"   # then pass $DATA_PATH to --data-path
"""

import argparse
import os
import sys

import _bootstrap  # noqa: F401

from dev.demo_data import demo_data_dir, prepare_demo_data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=demo_data_dir())
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    data_path, tokenizer_model = prepare_demo_data(args.output_dir, args.workers)
    print(f"DATA_PATH='{data_path}'")
    print(f"TOKENIZER_MODEL='{tokenizer_model}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
