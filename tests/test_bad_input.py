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


def _dataset_with_meta(tmp_path, books_data, **meta):
    """A copy of the books dataset's prefix (links to its files) whose _meta.json says ``meta``."""
    import json

    prefix = tmp_path / "copy_text_document"
    for ext in (".bin", ".idx"):
        os.symlink(books_data[0] + ext, str(prefix) + ext)
    with open(books_data[0] + "_meta.json") as f:
        record = json.load(f)
    (tmp_path / "copy_text_document_meta.json").write_text(json.dumps({**record, **meta}))
    return str(prefix)


@pytest.mark.parametrize("extra, expected", [
    (["--beta", "5"], "--beta: preference-loss flags, but --data-path holds pretrain data"),
    (["--preference-loss", "simpo", "--num-rejected", "1"], "--preference-loss --num-rejected: preference-loss flags"),
    (["--pose-num-chunks", "3"], "--pose-num-chunks is read by --position-scheme pose only (this run: contiguous)"),
    (["--position-scheme", "pose", "--longrecipe-contiguous-prefix"], "--longrecipe-contiguous-prefix is read by --position-scheme longrecipe only"),
])
def test_flags_that_cannot_apply_are_refused(books_data, tmp_path, extra, expected):
    stderr = _train(TINY_MODEL + data_args(*books_data, cache=str(tmp_path / "c")) + extra,
                    tmp_path)
    assert expected in stderr, stderr


def test_data_path_naming_the_token_flags_sidecar(books_data, tmp_path):
    sidecar = books_data[0] + "_tokenflags"
    assert os.path.exists(sidecar + ".idx")
    stderr = _train(TINY_MODEL + data_args(sidecar, books_data[1], cache=str(tmp_path / "c")),
                    tmp_path)
    assert f"--data-path {sidecar} names the token-flags sidecar" in stderr, stderr
    assert f"--data-path {books_data[0]}" in stderr


@pytest.mark.parametrize("meta, expected", [
    ({"tokenizer_type": "HuggingFaceTokenizer"}, "--tokenizer-type SentencePieceTokenizer disagrees with"),
    ({"tokenizer_model": "OTHER"}, "is not the tokenizer"),
])
def test_dataset_preprocessed_with_another_tokenizer(books_data, tmp_path, meta, expected):
    other = tmp_path / "other.model"
    other.write_bytes(b"not the same tokenizer")
    if meta.get("tokenizer_model") == "OTHER":
        meta = {"tokenizer_model": str(other)}
    data = tmp_path / "data"
    data.mkdir()
    prefix = _dataset_with_meta(data, books_data, **meta)
    stderr = _train(TINY_MODEL + data_args(prefix, books_data[1], cache=str(tmp_path / "c")),
                    tmp_path)
    assert expected in stderr and "copy_text_document_meta.json" in stderr, stderr


def test_a_copy_of_the_recorded_tokenizer_is_accepted(books_data, tmp_path):
    import shutil

    from megatron_ext.data import dataset_checks

    copy = tmp_path / "copy.model"
    shutil.copy(books_data[1], copy)
    prefix = _dataset_with_meta(tmp_path, books_data)
    dataset_checks.check_prefix(prefix, "SentencePieceTokenizer", str(copy))  # no error
