#!/usr/bin/env bash
# Download, on a machine with network, the wheels that the GPU check machine lacks, into .whl/
# (repository root; git-ignored). That machine has Python 3.12, torch (CUDA) and Triton, no network
# and no Transformer Engine, flash-attn or megatron-core. There, from the repository root:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
#         PYTHONPATH=/tmp/site:. python3 tools/gpu_check.py --output $OUT/gpu_check.json
#
# Usage:  tools/prepare_gpu_wheels.sh [DEST]      (DEST defaults to .whl; PYTHON=... picks the pip)
#
# What and why (cp312, manylinux x86_64; versions as in requirements.txt):
#   megatron-core  0.16.1  platform-specific wheel (compiled dataset helpers); Requires-Dist: torch,
#                          numpy, packaging>=24.2 (everything else is an extra)
#   numpy, packaging       megatron-core's requirements; a torch wheel requires neither. If the image
#                          has numpy already, this one (2.x) shadows it on PYTHONPATH: torch accepts it
#   sentencepiece, tqdm    packed_training_smoke: trains a small SentencePiece tokenizer and tokenizes
#                          a dataset with megatron_ext.data.preprocess (which imports tqdm), then runs
#                          python -m megatron_ext.train on it
# Megatron-Core's optional imports (yaml, tensorboard, wandb, apex, transformer_engine, ...) are all
# guarded; nothing else is imported on gpu_check's code path or by megatron_ext.train.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

WHEELS=(
    "megatron-core==0.16.1"
    "numpy==2.4.6"
    "packaging==26.4"
    "sentencepiece==0.2.3"
    "tqdm==4.70.1"
)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)

mkdir -p "$DEST"
# One version of each: an older wheel left here would be installed next to the new one.
rm -f "$DEST"/*.whl
"$PYTHON" -m pip download --no-deps "${TARGET[@]}" -d "$DEST" "${WHEELS[@]}"

# The megatron-core wheel must not have grown requirements that the GPU machine lacks.
meta=$(unzip -p "$DEST"/megatron_core-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
unexpected=$(echo "$meta" | grep -v -E '^Requires-Dist: (torch|numpy|packaging)\b' || true)
if [[ -n "$unexpected" ]]; then
    echo "prepare_gpu_wheels: megatron-core requires more than torch/numpy/packaging:" >&2
    echo "$unexpected" >&2
    exit 1
fi

# They must install the way the GPU machine will install them (offline, no dependency resolution).
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile "${TARGET[@]}" --target "$check" \
    "$DEST"/*.whl

ls -l "$DEST"/*.whl
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "prepare_gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DEST"
if (( total > 50 * 1024 * 1024 )); then
    echo "prepare_gpu_wheels: more than 50 MiB" >&2
    exit 1
fi
