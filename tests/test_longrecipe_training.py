"""End to end: LongRecipe positions teach a model trained on 1024-token samples to use 4096.

Two runs of the same small model from the same seed on the same Austen samples, 30 iterations at
--seq-length 1024: one with contiguous positions, one with longrecipe positions spread over a
4096 target window. Both are then scored on a held-out novel in 4096-token windows with plain
contiguous positions (``--skip-train``). The LongRecipe model has seen relative distances up to
4095 and must score better there; the contiguous one has never seen a position beyond 1023.
"""

import pytest

from launch import read_metrics_file, torchrun

pytestmark = pytest.mark.multiprocess

MODEL = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
         "--num-attention-heads", "4", "--num-query-groups", "2",
         "--untie-embeddings-and-output-weights", "--seed", "1234", "--device", "cpu",
         "--max-position-embeddings", "4096"]
TRAIN = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "30",
         "--lr", "3e-3", "--lr-warmup-iters", "3", "--seq-length", "1024",
         "--target-seq-length", "4096"]


def test_longrecipe_positions_beat_contiguous_at_the_target_length(books_data, tmp_path):
    prefix, tokenizer_model = books_data
    # Six novels: five to train on, the sixth held out for scoring.
    data = ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", tokenizer_model, "--data-cache-path", str(tmp_path / "cache"),
            "--split", "5,1,0"]
    losses = {}
    for scheme in ("contiguous", "longrecipe"):
        ckpt = str(tmp_path / scheme)
        torchrun(1, [*MODEL, *data, *TRAIN, "--position-scheme", scheme, "--save", ckpt])
        metrics = str(tmp_path / f"{scheme}-eval.jsonl")
        torchrun(1, [*MODEL, *data, "--seq-length", "4096", "--micro-batch-size", "1",
                     "--global-batch-size", "1", "--load", ckpt, "--finetune", "--skip-train",
                     "--eval-iters", "4", "--metrics-jsonl", metrics])
        (record,) = [r for r in read_metrics_file(metrics) if r.get("kind") == "eval"]
        assert record["eval_tokens"] == 4 * 4096  # four full windows of the held-out novel
        losses[scheme] = record["eval_loss"]
    print(f"held-out loss at 4096 tokens: contiguous-trained {losses['contiguous']:.4f}, "
          f"longrecipe-trained {losses['longrecipe']:.4f}")
    assert losses["longrecipe"] < losses["contiguous"]
