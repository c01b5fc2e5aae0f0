"""GPU acceptance check in one command (the logic and its documentation: megatron_ext/gpu_check.py).

On the GPU machine, after tools/prepare_gpu_wheels.sh filled .whl/ here:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:. python3 tools/gpu_check.py --output $OUT/gpu_check.json

On a CPU-only machine (GPU-only stages are SKIP):

    python tools/gpu_check.py --device cpu --tiny --output /tmp/gpu_check.json
"""

import sys

import _bootstrap  # noqa: F401  (makes megatron_ext importable from a source checkout)

from megatron_ext.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
