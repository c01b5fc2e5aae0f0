"""Bad flags fail early with an error naming the flag, a non-zero exit, and nothing written."""

import os
import subprocess
import sys

import pytest

from launch import REPO_ROOT, TINY_MODEL, data_args


def _train(args, tmp_path, world_size=1):
    outputs = ["--save", str(tmp_path / "ckpt"), "--metrics-jsonl", str(tmp_path / "m.jsonl"),
               "--tensorboard-dir", str(tmp_path / "tb")]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "WORLD_SIZE": str(world_size)}
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *args, *outputs],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert not any((tmp_path / name).exists() for name in ("ckpt", "m.jsonl", "tb"))
    return proc.stderr


def _with(flag, value):
    args = list(TINY_MODEL)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize("args, world_size, expected", [
    (_with("--tensor-model-parallel-size", "3"), 3, "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)"),
    (_with("--context-parallel-size", "2") + ["--seq-length", "66"], 2, "--seq-length (66) must be divisible by 2 x --context-parallel-size"),
    (_with("--tensor-model-parallel-size", "2"), 3, "world size 3 is not divisible by --tensor-model-parallel-size (2)"),
    (_with("--num-query-groups", "3"), 1, "--num-query-groups (3)"),
    (_with("--global-batch-size", "3"), 2, "--global-batch-size (3) must be divisible by --micro-batch-size (1) x data-parallel size (2)"),
])
def test_invalid_layouts_name_the_flag(books_data, tmp_path, args, world_size, expected):
    stderr = _train(args + data_args(*books_data, cache=str(tmp_path / "c")), tmp_path, world_size)
    assert expected in stderr, stderr


def test_missing_data_path(books_data, tmp_path):
    stderr = _train(TINY_MODEL + ["--tokenizer-type", "SentencePieceTokenizer",
                                  "--tokenizer-model", books_data[1]], tmp_path)
    assert "--data-path is required" in stderr


def test_data_path_that_does_not_exist(books_data, tmp_path):
    stderr = _train(TINY_MODEL + data_args(str(tmp_path / "nope_text_document"), books_data[1],
                                           cache=str(tmp_path / "c")), tmp_path)
    assert "--data-path" in stderr and "nope_text_document.bin does not exist" in stderr


def test_malformed_blend(books_data, tmp_path):
    stderr = _train(TINY_MODEL + data_args(f"0.3 {books_data[0]} {books_data[0]}", books_data[1],
                                           cache=str(tmp_path / "c")), tmp_path)
    assert "--data-path" in stderr


def test_split_leaving_validation_without_documents(books_data, tmp_path):
    # Six novels: a 2% validation share rounds to zero documents.
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    args = TINY_MODEL + data_args(*books_data, cache=str(tmp_path / "c")) + [
        "--split", "98,2,0", "--eval-interval", "1", "--eval-iters", "1", "--train-iters", "1", "--lr-warmup-iters", "0"]
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # a UserError: one line, argparse's usage status
    assert "--split 98,2,0 gives the valid split" in proc.stderr and "no documents" in proc.stderr
