"""tools/preprocess_data.py on real text with the real Llama-style SentencePiece tokenizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece

from launch import REPO_ROOT
from dev import assets
from megatron_ext.arguments import ArgumentError, parse_data_path
from megatron_ext.data.preprocess import MalformedRow, preprocess, read_documents


@pytest.fixture(scope="module")
def tokenizer_model():
    return str(assets.require(assets.mistral_sentencepiece_model))


@pytest.fixture(scope="module")
def stdlib_jsonl(tmp_path_factory):
    """20 real stdlib packages as documents, one with a nested field for --json-keys paths."""
    src = assets.require(assets.corpus_jsonl, "pystdlib")
    out = tmp_path_factory.mktemp("pp") / "code.jsonl"
    with open(src) as f, open(out, "w") as g:
        for _, line in zip(range(20), f):
            row = json.loads(line)
            g.write(json.dumps({"text": row["text"][:20000], "meta": {"title": row["id"]}}) + "\n")
    return str(out)


def _run_tool(*args):
    return subprocess.run([sys.executable, "tools/preprocess_data.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_round_trip_matches_sentencepiece_and_appends_eod(tmp_path, stdlib_jsonl, tokenizer_model):
    proc = _run_tool("--input", stdlib_jsonl, "--output-prefix", str(tmp_path / "code"),
                     "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
                     "--append-eod", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "20 documents" in proc.stdout
    docs = read_documents(str(tmp_path / "code_text_document"))
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    with open(stdlib_jsonl) as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(docs) == len(texts) == 20
    for doc, text in zip(docs, texts):
        assert doc[-1] == sp.eos_id()
        assert doc.tolist()[:-1] == sp.encode(text)
        assert sp.decode(doc.tolist()[:-1]) == text
    assert docs[0].dtype == np.uint16  # 32000-token vocabulary fits in 16 bits


def test_worker_count_does_not_change_output(tmp_path, stdlib_jsonl, tokenizer_model):
    for workers in (1, 2):
        preprocess([stdlib_jsonl], str(tmp_path / f"w{workers}"), "SentencePieceTokenizer",
                   tokenizer_model, json_keys=["text", "meta.title"], workers=workers, progress=False)
    for key in ("text", "meta.title"):
        one = (tmp_path / f"w1_{key}_document.bin").read_bytes()
        two = (tmp_path / f"w2_{key}_document.bin").read_bytes()
        assert one == two and len(one) > 0


def test_malformed_row_names_file_and_line(tmp_path, stdlib_jsonl, tokenizer_model):
    bad = tmp_path / "bad.jsonl"
    lines = open(stdlib_jsonl).read().splitlines()[:3]
    bad.write_text("\n".join([lines[0], '{"text": 42}', lines[1], "not json", lines[2]]) + "\n")
    proc = _run_tool("--input", str(bad), "--output-prefix", str(tmp_path / "out"),
                     "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model)
    assert proc.returncode != 0
    assert f"{bad}:2: field 'text' (from --json-keys) is a int" in proc.stderr
    assert not os.path.exists(tmp_path / "out_text_document.idx")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no partial or temporary files

    stats = preprocess([str(bad)], str(tmp_path / "out"), "SentencePieceTokenizer", tokenizer_model,
                       skip_malformed=True, progress=False)
    assert (stats.documents, stats.skipped_malformed) == (3, 2)
    assert len(read_documents(str(tmp_path / "out_text_document"))) == 3


def test_missing_key_is_malformed(tmp_path, stdlib_jsonl, tokenizer_model):
    with pytest.raises(MalformedRow, match="field 'body'"):
        preprocess([stdlib_jsonl], str(tmp_path / "x"), "SentencePieceTokenizer", tokenizer_model,
                   json_keys=["body"], progress=False)


def test_weighted_data_path_parsing():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["0.7 a 0.3 b"]) == (["a", "b"], [0.7, 0.3])
    with pytest.raises(ArgumentError, match="weight"):
        parse_data_path(["a", "b"])
