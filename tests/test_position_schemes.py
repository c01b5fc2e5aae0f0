"""Position schemes: properties over thousands of samples, and the loader's use of them on real text.

The pure functions are checked with hypothesis (random segment layouts and target lengths); the
loader is checked on Austen's novels, whose sentence boundaries were recorded at preprocessing.
"""

import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_ext.arguments import parse_data_path
from megatron_ext.data import position_schemes as ps
from megatron_ext.data import token_flags
from megatron_ext.parallel.cp_layout import merge_cp_slices, slice_for_cp
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.data.tokenizer import build_tokenizer

segment_layouts = st.lists(st.integers(1, 60), min_size=1, max_size=80)


@st.composite
def layout_and_target(draw):
    lengths = draw(segment_layouts)
    n = sum(lengths)
    return lengths, draw(st.integers(n, 40 * n))


def check_common(ids, target):
    assert ids[0] == 0
    assert (np.diff(ids) >= 1).all(), "position ids must strictly increase"
    assert ids[-1] <= target - 1


@settings(max_examples=2000, deadline=None)
@given(layout_and_target(), st.integers(0, 2**32 - 1), st.booleans())
def test_longrecipe_properties(layout, seed, prefix):
    lengths, target = layout
    ids = ps.longrecipe(lengths, target, np.random.default_rng(seed), contiguous_prefix=prefix)
    check_common(ids, target)
    starts = np.cumsum([0] + lengths[:-1])
    jumps = np.flatnonzero(np.diff(ids) > 1) + 1
    # Gaps open only where a new segment starts, and segments stay contiguous inside.
    assert set(jumps.tolist()) <= set(starts.tolist())
    for start, length in zip(starts, lengths):
        assert (np.diff(ids[start:start + length]) == 1).all()
    if len(lengths) > 1 and not prefix:
        # Full coverage: every unused position is spent on a gap, so the last id is T-1.
        assert ids[-1] == target - 1
    if len(lengths) == 1:
        assert ids.tolist() == list(range(lengths[0]))  # no gap to open


@settings(max_examples=1000, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(1, 20))
def test_pose_chunk_structure(length, chunks, seed, stretch):
    target = length * stretch
    ids = ps.pose(length, target, np.random.default_rng(seed), num_chunks=chunks)
    check_common(ids, target)
    jumps = np.flatnonzero(np.diff(ids) > 1)
    # N chunks: at most N-1 jumps; each chunk contiguous; the biases never exceed T - n.
    assert len(jumps) <= min(chunks, length) - 1
    assert ids[-1] - (length - 1) <= target - length


def test_longrecipe_mean_coverage_on_sentence_lengths():
    """Coverage (max+1)/T averaged over realistic samples: >= 0.98 (released code: ~0.65)."""
    rng = np.random.default_rng(0)
    coverage = []
    for index in range(2000):
        lengths = rng.geometric(1 / 25, size=400)
        lengths = lengths[np.cumsum(lengths) <= 4096]
        target = 4096 * 10 // 3
        ids = ps.longrecipe(lengths, target, ps.sample_rng(7, 0, index),
                            contiguous_prefix=index % 2 == 0)
        coverage.append((ids[-1] + 1) / target)
    assert np.mean(coverage) >= 0.98


def test_pose_skip_biases_follow_the_paper_distribution():
    """u_1 ~ U{0..T-n} for two chunks: mean (T-n)/2, and a skip happens almost always."""
    n, target = 512, 4096
    biases = [ps.pose(n, target, ps.sample_rng(1, 0, i))[-1] - (n - 1) for i in range(4000)]
    assert abs(np.mean(biases) - (target - n) / 2) < 0.05 * (target - n)
    assert np.mean(np.array(biases) > 0) > 0.99


def test_same_seed_and_index_give_the_same_ids_in_another_process():
    lengths = [13, 7, 30, 2, 44, 9]
    here = ps.longrecipe(lengths, 1000, ps.sample_rng(5, 3, 17)).tolist()
    code = ("from megatron_ext.data import position_schemes as ps;"
            f"print(ps.longrecipe({lengths}, 1000, ps.sample_rng(5, 3, 17)).tolist())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert there == str(here)
    assert ps.longrecipe(lengths, 1000, ps.sample_rng(5, 3, 18)).tolist() != here


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="--target-seq-length"):
        ps.longrecipe([10, 10], 15, np.random.default_rng(0))
    with pytest.raises(ValueError, match="--pose-num-chunks"):
        ps.pose(10, 20, np.random.default_rng(0), num_chunks=0)


@pytest.fixture(scope="module")
def austen_datasets(books_data, tmp_path_factory):
    prefix, tokenizer_model = books_data
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    cache = str(tmp_path_factory.mktemp("cache"))

    def build(scheme, target=4096, **options):
        train, _, _ = build_gpt_datasets(parse_data_path([prefix]), "98,2,0", 1024, 1234, tokenizer,
                                         [64, 0, 0], cache, position_scheme=scheme,
                                         target_seq_length=target, **options)
        return train
    return build, tokenizer


def test_loader_longrecipe_jumps_only_at_recorded_sentence_ends(austen_datasets):
    build, tokenizer = austen_datasets
    dataset = build("longrecipe")
    coverage = []
    for index in range(64):
        sample = dataset[index]
        ids = sample["position_ids"].numpy()
        check_common(ids, 4096)
        coverage.append((ids[-1] + 1) / 4096)
        jumps = np.flatnonzero(np.diff(ids) > 1)
        flags = dataset.sample_flags(index)[:-1]
        assert ((flags[jumps] & token_flags.SEGMENT_END) != 0).all()
        # The token before every gap really closes a sentence or a line of the text.
        for j in jumps[:20]:
            piece = tokenizer.detokenize([int(sample["tokens"][j])])
            assert token_flags.ends_segment(piece, "sentence"), piece
    assert np.mean(coverage) >= 0.98


def test_loader_positions_are_deterministic_and_cp_slices_recombine(austen_datasets):
    build, _ = austen_datasets
    first, again = build("longrecipe"), build("longrecipe")
    for index in (0, 5, 63):
        a, b = first[index], again[index]
        assert a["position_ids"].tolist() == b["position_ids"].tolist()
        batch = {k: v[None] for k, v in a.items()}
        for cp in (2, 4):
            parts = [slice_for_cp(batch, cp, r)["position_ids"] for r in range(cp)]
            assert merge_cp_slices(parts).tolist() == batch["position_ids"].tolist()
    assert first[0]["position_ids"].tolist() != first[1]["position_ids"].tolist()


def test_loader_refuses_longrecipe_without_recorded_boundaries(books_data, tmp_path):
    import shutil

    prefix, tokenizer_model = books_data
    bare = str(tmp_path / "bare")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, bare + ext)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    with pytest.raises(ValueError, match="re-run tools/preprocess_data.py"):
        build_gpt_datasets(parse_data_path([bare]), "98,2,0", 256, 1, tokenizer, [4, 0, 0],
                           str(tmp_path / "cache"), position_scheme="longrecipe",
                           target_seq_length=1024)


@pytest.mark.parametrize("extra, message", [
    # T defaults to --max-position-embeddings, which defaults to --seq-length: a silent no-op.
    (["--position-scheme", "pose", "--packed-documents"], "--target-seq-length T = 64"),
    (["--position-scheme", "longrecipe", "--packed-documents", "--max-position-embeddings", "256",
      "--target-seq-length", "64"], "not longer than --seq-length 64"),
    # One set of ids over a window of several documents needs the explicit flag.
    (["--position-scheme", "longrecipe", "--max-position-embeddings", "256"],
     "Add --packed-documents"),
    (["--positions-across-documents"], "--positions-across-documents applies to"),
    (["--position-scheme", "pose", "--max-position-embeddings", "256", "--packed-documents",
      "--positions-across-documents"], "--positions-across-documents applies to"),
])
def test_skip_wise_schemes_refuse_what_would_train_something_else(books_data, extra, message):
    from megatron_ext import arguments
    from megatron_ext.errors import ArgumentError

    prefix, tokenizer = books_data
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--data-path", prefix, "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", tokenizer]
    with pytest.raises(ArgumentError, match=re.escape(message)):
        arguments.finalize(arguments.build_parser().parse_args(base + extra), world_size=1)
    # The documented ways through are accepted.
    for fine in (["--position-scheme", "longrecipe", "--packed-documents",
                  "--max-position-embeddings", "256"],
                 ["--position-scheme", "pose", "--positions-across-documents",
                  "--max-position-embeddings", "256"]):
        cfg = arguments.finalize(arguments.build_parser().parse_args(base + fine), world_size=1)
        assert cfg.data.target_seq_length == 256
