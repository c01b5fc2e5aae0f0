"""A context-parallel rank whose slice holds no loss target at all still gives the CP=1 loss and
gradients (no NaN from a 0 / 0 anywhere on that rank or in its peers).

Megatron's load-balanced CP layout gives rank r the chunks r and 2*CP-1-r of 2*CP equal chunks;
under CP=2 rank 0 holds the first and last quarter of the sequence, rank 1 the middle half. The
data is built so that every target sits in one rank's quarters: short SFT conversations (the
template's system turn fills the first quarter, padding the last; the answer falls in the middle)
and shared-prefix preference rows (long prompts, short answers at the end, the sequence length
chosen so that the answers fall on one rank: rank 0's last quarter, or rank 1's middle half).
The test checks that with a formula of its own on the very samples the dataset serves, rather
than trusting the CP slicing code.
"""

import json

import numpy as np
import pytest
import torch

from launch import TINY_MODEL, probe, rel_diff
from dev import assets

pytestmark = pytest.mark.multiprocess

pytest_plugins = ("evaluate_fixtures",)  # smollm2

CP = 2


def rank_positions(seq_len, rank, cp=CP):
    """Global positions CP rank ``rank`` holds: its two chunks of seq_len / (2 cp) tokens."""
    chunk = seq_len // (2 * cp)
    return set(range(rank * chunk, (rank + 1) * chunk)) | set(
        range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk))


def targets_per_rank(target_positions, seq_len):
    return [len(set(target_positions) & rank_positions(seq_len, r)) for r in range(CP)]


def compare(single, cp2):
    """CP=2 equals CP=1: finite loss (relative 1e-6) and every parameter's gradient."""
    ref, got = single["metrics"][0], cp2["metrics"][0]
    assert np.isfinite(got["loss"]) and np.isfinite(got["grad_norm"]), got
    assert ref["loss_tokens"] == got["loss_tokens"]
    assert rel_diff(got["loss"], ref["loss"]) <= 1e-6, (ref["loss"], got["loss"])
    assert rel_diff(got["grad_norm"], ref["grad_norm"]) <= 1e-6
    assert single["grads"].keys() == cp2["grads"].keys() and len(single["grads"]) >= 10
    for name, g in single["grads"].items():
        other = cp2["grads"][name]
        assert torch.isfinite(other).all(), name
        scale = g.abs().max().clamp(min=1e-12)
        assert (other - g).abs().max() <= 1e-5 * scale, name


# ------------------------------------------------------------------------------------------------
# SFT: the answers all in CP rank 1's half
# ------------------------------------------------------------------------------------------------

SFT_SEQ = 64
QA = [("Who wrote Emma?", "Jane Austen wrote it."),
      ("Where does Emma live?", "At Hartfield, in Highbury."),
      ("Who is Mr. Knightley?", "A neighbour and old friend."),
      ("Who is Harriet Smith?", "Emma's young friend."),
      ("Who is Miss Bates?", "A talkative spinster."),
      ("Who marries Mr. Elton?", "Augusta Hawkins does."),
      ("Who is Frank Churchill?", "Mr. Weston's son."),
      ("Who is Jane Fairfax?", "Miss Bates's niece.")]


@pytest.fixture(scope="module")
def sft_setting(tmp_path_factory):
    from megatron_ext.data.preprocess import output_prefix_for, preprocess

    root = tmp_path_factory.mktemp("zero-target-sft")
    hf_dir = str(assets.require(assets.smollm2_hf_dir))
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in QA]
    jsonl = root / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess([str(jsonl)], str(root / "chat"), "HuggingFaceTokenizer", hf_dir,
               json_keys=["messages"], append_eod=False, progress=False)
    prefix = output_prefix_for(str(root / "chat"), "messages")
    args = [*TINY_MODEL, "--seq-length", str(SFT_SEQ), "--lr-warmup-iters", "0",
            "--train-iters", "1", "--data-path", prefix, "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", hf_dir, "--data-cache-path",
            str(root / "cache"), "--split", "100,0,0", "--objective", "sft"]
    return root, prefix, hf_dir, args


def test_sft_rank_without_targets_gives_the_cp1_loss_and_gradients(sft_setting):
    from megatron_ext.arguments import parse_data_path
    from megatron_ext.data.gpt_data import build_gpt_datasets
    from megatron_ext.data.tokenizer import build_tokenizer

    root, prefix, hf_dir, args = sft_setting
    # Every sample training can draw (one iteration of 4 from these windows): its targets all
    # on CP rank 1, none on rank 0.
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    train, _, _ = build_gpt_datasets(parse_data_path([prefix]), "100,0,0", SFT_SEQ, 1234,
                                     tokenizer, [4, 0, 0], str(root / "check-cache"),
                                     packed_documents=True, sft=True, document_packing="whole")
    for index in range(len(train)):
        targets = np.flatnonzero(train[index]["loss_mask"].numpy()).tolist()
        rank0, rank1 = targets_per_rank(targets, SFT_SEQ)
        assert rank0 == 0 and rank1 == len(targets) > 0, (index, targets)

    single = probe(1, root / "cp1", args)
    cp2 = probe(CP, root / "cp2", [*args, "--context-parallel-size", str(CP)])
    compare(single, cp2)


# ------------------------------------------------------------------------------------------------
# Preference: the answers all on one CP rank (either one: rank 0 reports the rows' losses)
# ------------------------------------------------------------------------------------------------

NUM_REJECTED = 2


@pytest.fixture(scope="module")
def pref_setting(smollm2, tmp_path_factory):
    from dev.demo_preference import make_preference_rows
    from megatron_ext.data.preference_samples import PreferenceRows, shared_prefix_sample
    from megatron_ext.data.preprocess_preference import data_prefix_for, preprocess_preference

    root = tmp_path_factory.mktemp("zero-target-preference")

    def rows_of(rows, name):
        jsonl = root / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        preprocess_preference([str(jsonl)], str(root / name), "HuggingFaceTokenizer",
                              smollm2["hf"], context_chunk_tokens=256, progress=False)
        prefix = data_prefix_for(str(root / name))
        data = PreferenceRows(prefix)
        return prefix, [data.row(i, NUM_REJECTED) for i in range(len(data))]

    # Long prompts (four context passages) and short answers at the end of each shared-prefix
    # row: tokens before the first scored one, and the row's length.
    candidates = make_preference_rows(num_rows=16, num_chunks=4, chunk_chars=400,
                                      num_rejected=NUM_REJECTED, seed=5)
    _, tokenized = rows_of(candidates, "candidates")
    assert len(tokenized) == len(candidates)  # row i is candidate i
    lengths = [(len(r.prompt) - 1, len(r.prompt) - 1 + sum(1 + len(a) for a in r.answers))
               for r in tokenized]

    def build(empty_rank):
        """Four rows (one global batch) and a --seq-length (a multiple of 8) that put every
        answer outside ``empty_rank``'s quarters. Rank 1 empty: the prompt fills the first three
        quarters, the answers sit in the last. Rank 0 empty: the prompt covers the first quarter
        and the row ends by three quarters (padding after)."""
        def fits(prompt, total, seq):
            if empty_rank == 1:
                return total <= seq and 4 * prompt >= 3 * seq
            return 4 * total <= 3 * seq and 4 * prompt >= seq

        for seq in range(8, 2 * max(total for _, total in lengths), 8):
            fit = [i for i, (prompt, total) in enumerate(lengths) if fits(prompt, total, seq)]
            if len(fit) >= 4:
                break
        assert len(fit) >= 4, lengths
        prefix, samples = rows_of([candidates[i] for i in fit[:4]], f"pref-{empty_rank}")
        scored = [np.flatnonzero(shared_prefix_sample(row, np.arange(len(row.prompt)), seq, 0)
                                 ["score_branch"] >= 0).tolist() for row in samples]
        args = [*TINY_MODEL, "--seq-length", str(seq), "--lr-warmup-iters", "0",
                "--train-iters", "1", "--data-path", prefix, "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", smollm2["hf"], "--split", "100,0,0",
                "--preference-packing", "shared-prefix"]
        return seq, scored, args

    return root, build


@pytest.mark.parametrize("empty_rank", [0, 1])
def test_preference_rank_without_answers_gives_the_cp1_loss_and_gradients(pref_setting,
                                                                          empty_rank):
    root, build = pref_setting
    seq, scored, args = build(empty_rank)
    for positions in scored:
        per_rank = targets_per_rank(positions, seq)
        assert per_rank[empty_rank] == 0 and per_rank[1 - empty_rank] == len(positions) > 0, \
            (seq, positions[:3], positions[-3:])

    single = probe(1, root / f"cp1-{empty_rank}", args)
    cp2 = probe(CP, root / f"cp2-{empty_rank}", [*args, "--context-parallel-size", str(CP)])
    assert single["metrics"][0]["loss_tokens"] == 4  # rows
    compare(single, cp2)
