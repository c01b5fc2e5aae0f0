"""Packed documents: attention and positions restart at every EOD, identically under CP.

Real text with many short documents (Austen paragraphs), packed into 64-token sequences, so
document boundaries fall inside sequences and across context-parallel chunks and ranks.
"""

import json

import pytest

from launch import TINY_MODEL, data_args, rel_diff, run_from, save_initial_checkpoint
from dev import assets
from megatron_ext.parallel.cp_layout import document_ids_from_eod
from megatron_ext.data.preprocess import output_prefix_for, preprocess

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory, books_data):
    root = tmp_path_factory.mktemp("packed")
    novel = assets.require(assets.austen_novels) / "persuasion.txt"
    paras = [p.replace("\n", " ").strip() for p in novel.read_text().split("\n\n")]
    paras = [p for p in paras if len(p) > 40][:400]
    jsonl = root / "paragraphs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    preprocess([str(jsonl)], str(root / "paras"), "SentencePieceTokenizer", books_data[1],
               append_eod=True, progress=False)
    return root, output_prefix_for(str(root / "paras"), "text"), books_data[1]


def test_document_ids_restart_after_every_eod():
    import torch

    tokens = torch.tensor([[5, 6, 2, 7, 2, 8, 9, 9]])
    assert document_ids_from_eod(tokens, eod_token=2).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]


def test_packed_losses_equal_under_context_parallelism(paragraphs):
    root, prefix, tokenizer = paragraphs
    data = data_args(prefix, tokenizer, cache=str(root / "cache"))
    init = save_initial_checkpoint(root, [*TINY_MODEL, *data])

    def run(name, nproc, extra):
        return run_from(init, root, name, nproc, [*TINY_MODEL, *data, *extra])

    packed = run("packed", 1, ["--packed-documents"])
    packed_cp2 = run("packed-cp2", 2, ["--packed-documents", "--context-parallel-size", "2"])
    plain = run("plain", 1, [])
    for ref, got in zip(packed, packed_cp2):
        assert ref["loss_tokens"] == got["loss_tokens"]
        assert rel_diff(got["loss"], ref["loss"]) <= (1e-5 if ref["iteration"] == 1 else 1e-4)
    # Document masking, restarted positions and masked cross-document targets all change the loss.
    assert packed[0]["loss_tokens"] < plain[0]["loss_tokens"]
    assert rel_diff(packed[0]["loss"], plain[0]["loss"]) > 1e-4
    # LongRecipe ids per document (over a window four times the row) agree under CP as well.
    longrecipe = ["--packed-documents", "--position-scheme", "longrecipe",
                  "--max-position-embeddings", "1024", "--target-seq-length", "1024"]
    spread = run("packed-longrecipe", 1, longrecipe)
    spread_cp2 = run("packed-longrecipe-cp2", 2, [*longrecipe, "--context-parallel-size", "2"])
    for ref, got in zip(spread, spread_cp2):
        assert ref["loss_tokens"] == got["loss_tokens"] == packed[ref["iteration"] - 1][
            "loss_tokens"]
        assert rel_diff(got["loss"], ref["loss"]) <= (1e-5 if ref["iteration"] == 1 else 1e-4)
    # (What the ids are - per document, from 0, spread to T-1 - is checked on the loader's
    # own samples in test_inspect_batches.py; a tiny model at initialisation barely feels them.)


@pytest.mark.parametrize("scheme", ["contiguous", "pose"])
def test_packed_documents_score_like_each_document_alone(paragraphs, tmp_path, scheme):
    import os
    import subprocess
    import sys

    from launch import REPO_ROOT, free_port

    _, _, tokenizer = paragraphs
    novel = assets.require(assets.austen_novels) / "emma.txt"
    texts = [p.replace("\n", " ") for p in novel.read_text().split("\n\n") if 150 < len(p) < 500][:3]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "tests/packed_alone_worker.py", tokenizer,
                           json.dumps(texts), scheme],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["documents"]) == 3 and sum(result["documents"]) <= 512
    assert result["max_rel_diff"] <= 1e-5, result
    if scheme == "pose":  # the ids really spread beyond the packed row
        assert result["largest_id"] > 512, result
