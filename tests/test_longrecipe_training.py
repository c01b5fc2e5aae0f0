"""End to end: train on 1024-token samples with LongRecipe positions over a 4096 window, then
score 4096-token windows.

Two runs of the same small model from the same seed on the same Austen samples, 30 iterations at
--seq-length 1024: one with contiguous positions, one with longrecipe positions spread over a 4096
target window. Both are then scored on a held-out novel in 4096-token windows with plain contiguous
positions (``--skip-train`` with ``--finetune``, so the checkpoint trained at 1024 is read at 4096).

What this asserts at CPU scale: skip-wise positions cost nothing in learning (the training loss
follows the contiguous run within 2%), and both models score the held-out 4096-token windows. The
paper's claim - the LongRecipe model scoring *better* at 4096 - needs a model that has learned to
use long-range positions; after 30 CPU iterations neither has (measured: 6.6655 vs 6.6658 on the
held-out novel), so the test prints both numbers instead of asserting an order that does not hold
yet at this scale.
"""

import pytest

from launch import read_metrics, read_metrics_file, torchrun

pytestmark = pytest.mark.multiprocess

MODEL = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256",
         "--num-attention-heads", "4", "--num-query-groups", "2",
         "--untie-embeddings-and-output-weights", "--seed", "1234", "--device", "cpu",
         "--max-position-embeddings", "4096"]
TRAIN = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "30",
         "--lr", "3e-3", "--lr-warmup-iters", "3", "--seq-length", "1024",
         "--target-seq-length", "4096"]


def test_longrecipe_training_scores_windows_four_times_longer(books_data, tmp_path):
    prefix, tokenizer_model = books_data
    # Six novels: five to train on, the sixth held out for scoring.
    data = ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", tokenizer_model, "--data-cache-path", str(tmp_path / "cache"),
            "--split", "5,1,0"]
    trained, held_out = {}, {}
    for scheme in ("contiguous", "longrecipe"):
        ckpt = str(tmp_path / scheme)
        metrics = str(tmp_path / f"{scheme}.jsonl")
        # Both packed (each novel's windows attend within the novel), so only positions differ.
        torchrun(1, [*MODEL, *data, *TRAIN, "--position-scheme", scheme, "--packed-documents",
                     "--save", ckpt, "--metrics-jsonl", metrics])
        trained[scheme] = read_metrics(metrics)
        scores = str(tmp_path / f"{scheme}-eval.jsonl")
        torchrun(1, [*MODEL, *data, "--seq-length", "4096", "--micro-batch-size", "1",
                     "--global-batch-size", "1", "--load", ckpt, "--finetune", "--skip-train",
                     "--eval-iters", "4", "--metrics-jsonl", scores])
        (record,) = [r for r in read_metrics_file(scores) if r.get("kind") == "eval"]
        assert record["eval_tokens"] == 4 * 4096  # four full windows of the held-out novel
        held_out[scheme] = record["eval_loss"]
    print(f"held-out loss at 4096 tokens: contiguous-trained {held_out['contiguous']:.4f}, "
          f"longrecipe-trained {held_out['longrecipe']:.4f}")
    for scheme, records in trained.items():
        assert records[-1]["loss"] < records[0]["loss"] - 3.0, scheme  # it learned
    final = {scheme: records[-1]["loss"] for scheme, records in trained.items()}
    assert abs(final["longrecipe"] - final["contiguous"]) <= 0.02 * final["contiguous"]
    # Scoring 4x longer windows than trained on stays close to the training loss for both.
    for scheme in held_out:
        assert held_out[scheme] < final[scheme] + 0.5, scheme
