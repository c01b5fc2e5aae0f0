"""tools/inspect_batches.py writes what training feeds the model, sample by sample."""

import json
import sys

import numpy as np

from launch import run
from megatron_ext.arguments import parse
from megatron_ext.data import token_flags
from megatron_ext.data.gpt_data import BatchLayout, MicroBatchIterator
from megatron_ext.objectives import datasets_for
from megatron_ext.data.tokenizer import build_tokenizer


def test_dump_matches_the_training_loader(books_data, tmp_path):
    prefix, tokenizer_model = books_data
    flags = ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", tokenizer_model, "--data-cache-path", str(tmp_path / "cache"),
             "--seq-length", "512", "--max-position-embeddings", "2048",
             "--position-scheme", "longrecipe", "--packed-documents", "--split", "100,0,0",
             "--seed", "99",
             "--context-parallel-size", "2", "--global-batch-size", "1"]
    out = tmp_path / "batches.jsonl"
    run([sys.executable, "tools/inspect_batches.py", *flags, "--num-samples", "3",
         "--output", str(out), "--decode"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]

    # The same samples straight from the loader training builds from the same flags.
    cfg = parse([*flags, "--train-iters", "3"], world_size=2)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    train, _, _ = datasets_for(cfg, tokenizer, [3, 0, 0])
    batches = MicroBatchIterator(train, BatchLayout(1, 1, 0, 1))
    for record in records:
        batch = next(batches)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert record[key] == batch[key][0].tolist(), key
        assert record["text"] == tokenizer.detokenize(record["tokens"])
        positions = np.array(record["position_ids"])
        documents = np.array(record["document_ids"])
        starts = np.flatnonzero(np.diff(documents, prepend=-1)).tolist()
        assert starts == record["document_starts"]  # pieces start where documents start
        segment_starts = set(record["segment_starts"])
        for first, end in zip(starts, starts[1:] + [len(positions)]):
            ids = positions[first:end]
            # Every document piece has its own ids over [0, T): from 0, increasing, below T.
            assert ids[0] == 0 and (np.diff(ids) > 0).all() and ids[-1] <= 2047
            # Gaps open only at the piece's own segment starts ...
            jumps = {first + j for j in (np.flatnonzero(np.diff(ids) > 1) + 1).tolist()}
            assert jumps <= segment_starts
            # ... and a piece with several segments spreads over the whole window.
            if any(first < s < end for s in segment_starts):
                assert ids[-1] == 2047, (first, end)
        # Each segment start follows a token that really ends a sentence or line.
        for start in record["segment_starts"][1:6]:
            if start in record["document_starts"]:
                continue  # a document end (the EOD token) ends a segment too
            piece = tokenizer.detokenize([record["tokens"][start - 1]])
            assert token_flags.ends_segment(piece, "sentence"), piece
        # The two CP ranks' token indices partition the sequence.
        cp = record["cp_rank_token_indices"]
        assert sorted(cp[0] + cp[1]) == list(range(512))
