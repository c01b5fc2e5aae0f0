#!/bin/bash
# Long-context pretraining with megatron_ext. Every size is an environment variable; the defaults
# are the CPU demo (2 gloo ranks, a 20M-parameter Llama-style model, real books + code, ~5 min).
#
#   bash examples/pretrain_long.sh                                        # starts torchrun itself (NPROC ranks)
#   torchrun --nproc-per-node 8 --no-python bash examples/pretrain_long.sh  # under your own torchrun
#   srun bash examples/pretrain_long.sh                                   # one SLURM task per GPU (slurm/)
#
# A GPU run of a Llama-3-8B-like model at 64K, for instance:
#   NPROC=8 TP=4 CP=2 NUM_LAYERS=32 HIDDEN_SIZE=4096 FFN_HIDDEN_SIZE=14336 NUM_HEADS=32 \
#   NUM_QUERY_GROUPS=8 SEQ_LENGTH=65536 ROTARY_BASE=500000 GLOBAL_BATCH_SIZE=64 PRECISION=bf16 \
#   DATA_PATH="0.7 /data/books_text_document 0.3 /data/code_text_document" \
#   TOKENIZER_TYPE=HuggingFaceTokenizer TOKENIZER_MODEL=/models/llama3 bash examples/pretrain_long.sh
# LongRecipe: train on 0.3x-length samples whose position ids cover the 128K target window, with a
# static RoPE base for that window (tools/rope_base.py prints it). Skip-wise schemes pack documents
# (--packed-documents), so each selected sample gets its own ids over [0, 128K):
#   SEQ_LENGTH=38400 MAX_POSITION_EMBEDDINGS=131072 POSITION_SCHEME=longrecipe ROTARY_BASE=... \
#   LOAD=/ckpt/llama3-8b-megatron bash examples/pretrain_long.sh --finetune
# Extra arguments are passed to `python -m megatron_ext.train` unchanged (they win over these).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}

NPROC=${NPROC:-2}
TP=${TP:-1}
PP=${PP:-1}
CP=${CP:-1}
NUM_LAYERS=${NUM_LAYERS:-4}
HIDDEN_SIZE=${HIDDEN_SIZE:-256}
FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-704}
NUM_HEADS=${NUM_HEADS:-8}
NUM_QUERY_GROUPS=${NUM_QUERY_GROUPS:-4}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
MAX_POSITION_EMBEDDINGS=${MAX_POSITION_EMBEDDINGS:-$SEQ_LENGTH}
POSITION_SCHEME=${POSITION_SCHEME:-contiguous}  # contiguous | pose | longrecipe
TARGET_SEQ_LENGTH=${TARGET_SEQ_LENGTH:-$MAX_POSITION_EMBEDDINGS}
ROTARY_BASE=${ROTARY_BASE:-10000}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-4}
TRAIN_ITERS=${TRAIN_ITERS:-40}
LR=${LR:-2e-3}
MIN_LR=${MIN_LR:-2e-4}
WARMUP_ITERS=${WARMUP_ITERS:-$(( TRAIN_ITERS / 10 ))}
EVAL_INTERVAL=${EVAL_INTERVAL:-20}
EVAL_ITERS=${EVAL_ITERS:-1}
SAVE_INTERVAL=${SAVE_INTERVAL:-20}
SPLIT=${SPLIT:-80,20,0}
PRECISION=${PRECISION:-fp32}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain_long}
SAVE=${SAVE:-$OUTPUT_DIR/checkpoints}
LOAD=${LOAD:-$SAVE}
METRICS_JSONL=${METRICS_JSONL:-$OUTPUT_DIR/metrics.jsonl}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-SentencePieceTokenizer}

under_launcher=false
[[ -n "${RANK:-}" || -n "${SLURM_PROCID:-}" ]] && under_launcher=true

if [[ -z "${DATA_PATH:-}" || -z "${TOKENIZER_MODEL:-}" ]]; then
    # The CPU demo's data (fetched and tokenized once; concurrent ranks wait on a lock).
    eval "$($PYTHON tools/prepare_demo_data.py)"
fi

scheme_flags=()
# pose / longrecipe draw one document's ids over the target window: documents are kept apart.
[[ "$POSITION_SCHEME" == "pose" || "$POSITION_SCHEME" == "longrecipe" ]] && \
    scheme_flags=(--packed-documents)

precision_flags=()
[[ "$PRECISION" == "bf16" ]] && precision_flags=(--bf16)
[[ "$PRECISION" == "fp16" ]] && precision_flags=(--fp16)

# shellcheck disable=SC2206
train_args=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --context-parallel-size "$CP"
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --ffn-hidden-size "$FFN_HIDDEN_SIZE"
    --num-attention-heads "$NUM_HEADS" --num-query-groups "$NUM_QUERY_GROUPS"
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$MAX_POSITION_EMBEDDINGS"
    --rotary-base "$ROTARY_BASE" --untie-embeddings-and-output-weights
    --position-scheme "$POSITION_SCHEME" --target-seq-length "$TARGET_SEQ_LENGTH"
    "${scheme_flags[@]}"
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
    --lr-warmup-iters "$WARMUP_ITERS" --weight-decay 0.1 --clip-grad 1.0
    --data-path $DATA_PATH --split "$SPLIT"
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
    --save "$SAVE" --load "$LOAD" --save-interval "$SAVE_INTERVAL"
    --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
    --log-interval 1 --metrics-jsonl "$METRICS_JSONL" --tensorboard-dir "$TENSORBOARD_DIR"
    "${precision_flags[@]}"
)

if $under_launcher; then
    exec $PYTHON -m megatron_ext.train "${train_args[@]}" "$@"
fi
exec $PYTHON -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29500}" \
    -m megatron_ext.train "${train_args[@]}" "$@"
