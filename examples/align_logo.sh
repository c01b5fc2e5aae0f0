#!/bin/bash
# LOGO preference alignment end to end: HF model -> Megatron -> LOGO training -> HF model.
# Every size is an environment variable; the defaults are the CPU demo: SmolLM2-135M-Instruct
# (offline asset), a small real preference set built from Austen novels (long-context retrieval:
# "which sentence follows ...?", the true sentence chosen, wrong retrievals rejected), 2 gloo
# ranks with CP=2, LOGO position synthesis over a 8K window, shared-prefix packing.
#
#   bash examples/align_logo.sh
#
# Your own model and data (any HF Llama-family folder; jsonl rows {"context" | "prompt",
# "question", "chosen", "rejected": [...]}), e.g. on 8 GPUs at 64K synthesised positions:
#   HF_MODEL=/models/Llama-3-8B-Instruct-80K PREFERENCE_JSONL=/data/logo.jsonl NPROC=8 TP=4 CP=2 \
#   SEQ_LENGTH=16384 TARGET_SEQ_LENGTH=65536 PRECISION=bf16 GLOBAL_BATCH_SIZE=64 TRAIN_ITERS=1200 \
#   LR=5e-7 bash examples/align_logo.sh --use-distributed-optimizer
# Extra arguments are passed to `python -m megatron_ext.train` unchanged (they win over these).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}

OUTPUT_DIR=${OUTPUT_DIR:-outputs/align_logo}
HF_MODEL=${HF_MODEL:-}
PREFERENCE_JSONL=${PREFERENCE_JSONL:-}
NPROC=${NPROC:-2}
TP=${TP:-1}
PP=${PP:-1}
CP=${CP:-2}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
TARGET_SEQ_LENGTH=${TARGET_SEQ_LENGTH:-8192}
POSITION_SCHEME=${POSITION_SCHEME:-logo}       # logo | contiguous
PACKING=${PACKING:-shared-prefix}              # shared-prefix | separate
# flex (fused) on GPUs, blockwise on CPU; the block size applies to blockwise only.
ATTENTION_BACKEND=${ATTENTION_BACKEND:-auto}
ATTENTION_BLOCK_SIZE=${ATTENTION_BLOCK_SIZE:-512}  # smaller score tiles; skips masked blocks
PREFERENCE_LOSS=${PREFERENCE_LOSS:-logo}       # logo | simpo
BETA=${BETA:-10}
GAMMA_BETA_RATIO=${GAMMA_BETA_RATIO:-0.3}
SFT_WEIGHT=${SFT_WEIGHT:-0.1}
CONTEXT_CHUNK_TOKENS=${CONTEXT_CHUNK_TOKENS:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-2}
TRAIN_ITERS=${TRAIN_ITERS:-4}
LR=${LR:-1e-6}
PRECISION=${PRECISION:-fp32}
DEMO_ROWS=${DEMO_ROWS:-48}

mkdir -p "$OUTPUT_DIR"
if [[ -z "$HF_MODEL" ]]; then
    HF_MODEL=$($PYTHON -c "from dev import assets; print(assets.require(assets.smollm2_hf_dir))")
fi
if [[ -z "$PREFERENCE_JSONL" ]]; then
    PREFERENCE_JSONL=$OUTPUT_DIR/austen_retrieval.jsonl
    $PYTHON tools/make_preference_demo.py --output "$PREFERENCE_JSONL" --num-rows "$DEMO_ROWS" \
        --num-chunks 6 --chunk-chars 900 --num-rejected 2 --seed 0
fi

echo "== 1/4 tokenize the preference rows with the model's chat template"
$PYTHON tools/preprocess_preference.py --input "$PREFERENCE_JSONL" \
    --output-prefix "$OUTPUT_DIR/data/pref" --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model "$HF_MODEL" --context-chunk-tokens "$CONTEXT_CHUNK_TOKENS" --workers 2
DATA_PATH=$OUTPUT_DIR/data/pref_preference_document

echo "== 2/4 convert $HF_MODEL to a Megatron checkpoint"
dtype=fp32
[[ "$PRECISION" == "bf16" ]] && dtype=bf16
$PYTHON tools/convert_checkpoint.py hf-to-megatron --hf-dir "$HF_MODEL" \
    --megatron-dir "$OUTPUT_DIR/base" --dtype "$dtype"
# shellcheck disable=SC2207  # the model's flags, one "--flag value" per line
model_args=( $(cat "$OUTPUT_DIR/base/megatron_args.txt") )

echo "== 3/4 LOGO training"
precision_flags=()
[[ "$PRECISION" == "bf16" ]] && precision_flags=(--bf16)
if [[ "$ATTENTION_BACKEND" == "auto" ]]; then
    ATTENTION_BACKEND=$($PYTHON -c "import torch; print('flex' if torch.cuda.is_available() else 'blockwise')")
fi
attention_flags=(--attention-backend "$ATTENTION_BACKEND")
[[ "$ATTENTION_BACKEND" == "blockwise" ]] && attention_flags+=(--attention-block-size "$ATTENTION_BLOCK_SIZE")
rm -rf "$OUTPUT_DIR/checkpoints"
$PYTHON -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29510}" \
    -m megatron_ext.train "${model_args[@]}" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --context-parallel-size "$CP" "${attention_flags[@]}" \
    --seq-length "$SEQ_LENGTH" --position-scheme "$POSITION_SCHEME" \
    --target-seq-length "$TARGET_SEQ_LENGTH" --preference-packing "$PACKING" \
    --preference-loss "$PREFERENCE_LOSS" --beta "$BETA" --gamma-beta-ratio "$GAMMA_BETA_RATIO" \
    --sft-weight "$SFT_WEIGHT" \
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE" \
    --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr 0 --lr-decay-style cosine \
    --lr-warmup-iters $(( TRAIN_ITERS / 8 + 1 )) --weight-decay 0.05 --adam-beta2 0.999 --clip-grad 1.0 \
    --data-path "$DATA_PATH" --split 90,10,0 --eval-interval "$TRAIN_ITERS" --eval-iters 1 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_MODEL" \
    --load "$OUTPUT_DIR/base" --finetune --save "$OUTPUT_DIR/checkpoints" \
    --log-interval 1 --metrics-jsonl "$OUTPUT_DIR/metrics.jsonl" \
    --tensorboard-dir "$OUTPUT_DIR/tensorboard" "${precision_flags[@]}" "$@"

echo "== 4/4 export the aligned model to a Hugging Face folder"
$PYTHON tools/convert_checkpoint.py megatron-to-hf --megatron-dir "$OUTPUT_DIR/checkpoints" \
    --hf-dir "$OUTPUT_DIR/hf" --reference-hf-dir "$HF_MODEL"
echo "aligned model: $OUTPUT_DIR/hf"
