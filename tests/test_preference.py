"""LOGO / SimPO preference alignment: positions, layouts, masks, losses and parallel equivalence.

Real data throughout: LOGO-style retrieval rows built from Austen novels
(``make_preference_rows``: K real passages as context, "which sentence follows ...?", the true
next sentence as chosen, wrong retrievals as rejected), rendered with SmolLM2's chat template.

- LOGO position synthesis: head at 0, chunks contiguous inside their own slots, question and answers
  after them, everything below the target; chunks that cannot fit are refused.
- ``separate`` and ``shared-prefix`` rows score the same (answer, position, token, label) sets, and
  the branch mask of our attention equals a dense reference mask.
- Iteration-1 loss, pref_loss and sft_loss equal a straightforward Hugging Face computation with
  the same SmolLM2 weights on the same rows (<= 1e-5 relative).
- TP=2, CP=2, PP=2, DP=2 and ``separate`` packing give the iteration losses of the single-process
  ``shared-prefix`` run (<= 1e-4 relative over 3 iterations); gradients of the two packings agree.
- DPO / IPO with an offline reference: tools/reference_logps.py's per-answer sums and counts equal
  transformers' on the dumped rows; a DPO iteration-1 loss equals TRL's sigmoid formula on
  transformers' sums of policy and reference; the file is the same under TP / CP / PP, and DPO /
  IPO losses follow it.
- Bad flag combinations fail early, naming the flag.
"""

import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from launch import REPO_ROOT, TINY_MODEL, free_port, read_metrics, rel_diff, run, run_from, \
    save_initial_checkpoint, torchrun
from megatron_ext.data import position_schemes
from dev.demo_preference import make_preference_rows
from megatron_ext.data.preference_samples import (PreferenceRows, branches,
                                                  layout_length, prompt_positions,
                                                  separate_sample, shared_prefix_sample)
from megatron_ext.data.preprocess_preference import data_prefix_for, preprocess_preference

pytest_plugins = ("evaluate_fixtures",)  # smollm2, smollm2_megatron

NUM_REJECTED = 2
TARGET = 4096


@pytest.fixture(scope="module")
def rows_jsonl(tmp_path_factory):
    rows = make_preference_rows(num_rows=16, num_chunks=4, chunk_chars=500,
                                num_rejected=NUM_REJECTED, seed=3)
    path = tmp_path_factory.mktemp("preference") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


@pytest.fixture(scope="module")
def pref_data(rows_jsonl, smollm2, tmp_path_factory):
    """SmolLM2-tokenized preference data: (data prefix, tokenizer folder, longest layouts)."""
    jsonl, _ = rows_jsonl
    out = tmp_path_factory.mktemp("preference-data") / "demo"
    stats = preprocess_preference([jsonl], str(out), "HuggingFaceTokenizer", smollm2["hf"],
                                  context_chunk_tokens=256, progress=False)
    assert stats.chat_template and stats.rows == 16
    prefix = data_prefix_for(str(out))
    data = PreferenceRows(prefix)
    longest = {layout: max(layout_length(*data.lengths(r, NUM_REJECTED), layout)
                           for r in range(len(data)))
               for layout in ("separate", "shared-prefix")}
    return prefix, smollm2["hf"], longest


def round_up(n, multiple=64):
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------------------------
# Positions and layouts
# ------------------------------------------------------------------------------------------------

def test_logo_positions_keep_chunks_whole_in_their_slots():
    rng = np.random.default_rng(0)
    starts_seen = set()
    for trial in range(300):
        chunks = rng.integers(1, 200, size=int(rng.integers(1, 12)))
        head, question, answer = int(rng.integers(1, 40)), int(rng.integers(1, 60)), \
            int(rng.integers(1, 100))
        lengths = [head, *chunks.tolist(), question]
        target = int(sum(lengths) + answer + rng.integers(0, 20000))
        slot = (target - head - question - answer) // len(chunks)
        if chunks.max() > slot:
            with pytest.raises(ValueError, match="--target-seq-length"):
                position_schemes.logo(lengths, answer, target, rng)
            continue
        ids = position_schemes.logo(lengths, answer, target, np.random.default_rng(trial))
        assert len(ids) == sum(lengths) and (np.diff(ids) > 0).all()
        assert ids[:head].tolist() == list(range(head))
        ends = np.cumsum(lengths)
        for i, n in enumerate(chunks):
            piece = ids[ends[i]:ends[i] + n]
            assert (np.diff(piece) == 1).all(), "a chunk must keep contiguous ids"
            assert head + i * slot <= piece[0] and piece[-1] < head + (i + 1) * slot
            starts_seen.add((len(chunks), i, int(piece[0] - head - i * slot)))
        tail = ids[ends[-2]:]
        assert tail[0] == ids[ends[-2] - 1] + 1 and (np.diff(tail) == 1).all()
        assert ids[-1] + answer <= target - 1
    assert len(starts_seen) > 200, "chunk offsets must be random inside the slots"


def test_layouts_score_the_same_answer_tokens(pref_data, rows_jsonl):
    prefix, hf_dir, longest = pref_data
    from megatron_ext.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    data = PreferenceRows(prefix)
    _, source_rows = rows_jsonl
    for index in range(len(data)):
        row = data.row(index, NUM_REJECTED)
        assert len(row.segment_lengths) == 2 + 4 and row.segment_lengths.sum() == len(row.prompt)
        positions = prompt_positions(row, "logo", TARGET, position_schemes.sample_rng(1, 2, index))
        per_branch = branches(row, positions)
        answers = [source_rows[index]["chosen"], *source_rows[index]["rejected"]]
        for branch, text in zip(per_branch, answers, strict=True):
            answer = branch["input_ids"][branch["labels"] != -100]
            assert tokenizer.detokenize(answer).startswith(text)
            assert branch["position_ids"].max() < TARGET and (np.diff(branch["position_ids"]) > 0).all()
        scored = []
        for sample in (separate_sample(row, positions, longest["separate"], 0),
                       shared_prefix_sample(row, positions, longest["separate"], 0)):
            keep = sample["score_branch"] >= 0
            scored.append(sorted(zip(sample["score_branch"][keep], sample["position_ids"][keep],
                                     sample["tokens"][keep], sample["labels"][keep])))
            # Every scored label is the next token of its branch.
            for b, branch in enumerate(per_branch):
                mine = sample["score_branch"] == b
                assert mine.sum() == (branch["labels"] != -100).sum()
        assert scored[0] == scored[1]


def test_branch_mask_equals_dense_reference():
    from megatron_ext.model.cp_attention import context_parallel_attention

    torch.manual_seed(0)
    s, b, heads, groups, dim = 48, 2, 4, 2, 8
    docs = torch.zeros(b, s, dtype=torch.long)
    branch = torch.zeros(b, s, dtype=torch.long)
    branch[:, 20:30], branch[:, 30:37], branch[:, 37:44] = 1, 2, 3
    docs[:, 44:] = 1  # padding document
    branch[1, 10:20] = 1  # a different shape in the second row
    q = torch.randn(s, b, heads, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(s, b, groups, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(s, b, groups, dim, dtype=torch.float64, requires_grad=True)
    out = context_parallel_attention(q, k, v, seq_len=s, cp_size=1, cp_rank=0, softmax_scale=0.3,
                                     query_document_ids=docs, key_document_ids=docs,
                                     query_branch_ids=branch, key_branch_ids=branch,
                                     max_block_size=8)
    i = torch.arange(s)
    visible = ((i[None, :, None] >= i[None, None, :]) & (docs[:, :, None] == docs[:, None, :])
               & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
    kk = k.repeat_interleave(heads // groups, dim=2)
    vv = v.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kk) * 0.3
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    reference = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), vv).reshape(s, b, heads * dim)
    assert torch.allclose(out, reference, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-10)
    # A branch token never sees another branch: perturbing branch 2 leaves branch 1 untouched.
    v2 = v.detach().clone()
    v2[30:37] += 1.0
    moved = context_parallel_attention(q, k, v2, seq_len=s, cp_size=1, cp_rank=0,
                                       softmax_scale=0.3, query_document_ids=docs,
                                       key_document_ids=docs, query_branch_ids=branch,
                                       key_branch_ids=branch, max_block_size=8)
    for other_branch in (slice(20, 30), slice(37, 44)):
        assert torch.equal(moved[other_branch, 0], out[other_branch, 0].detach())
    assert not torch.allclose(moved[30:37, 0], out[30:37, 0].detach())
    # ... while the shared prefix reaches every branch.
    v3 = v.detach().clone()
    v3[5] += 1.0
    shared = context_parallel_attention(q, k, v3, seq_len=s, cp_size=1, cp_rank=0,
                                        softmax_scale=0.3, query_document_ids=docs,
                                        key_document_ids=docs, query_branch_ids=branch,
                                        key_branch_ids=branch, max_block_size=8)
    for each_branch in (slice(20, 30), slice(30, 37), slice(37, 44)):
        assert not torch.allclose(shared[each_branch, 0], out[each_branch, 0].detach())
    assert torch.equal(shared[44:, 0], out[44:, 0].detach())  # the padding document does not


# ------------------------------------------------------------------------------------------------
# The loss against Hugging Face transformers (same SmolLM2 weights, same rows)
# ------------------------------------------------------------------------------------------------

def naive_loss(loss, chosen, rejected, beta, gamma, sft_weight):
    """One row's loss from its answers' mean log-probs, written from the papers' formulas."""
    import math

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    if loss == "sft-only":
        return -sft_weight * chosen
    if loss == "orpo":
        def log_odds(s):
            return math.log(math.exp(s) / (1 - math.exp(s)))

        pairs = [-log_sigmoid(log_odds(chosen) - log_odds(r)) for r in rejected]
        return -sft_weight * chosen + beta * sum(pairs) / len(pairs)
    margin = beta * (chosen - sum(rejected) / len(rejected)) - gamma
    return -log_sigmoid(margin) - sft_weight * chosen


@pytest.mark.parametrize("loss", ["logo", "simpo", "orpo", "sft-only"])
def test_losses_follow_their_formulas(loss):
    from megatron_ext.objectives.preference_loss import PreferenceLossConfig, preference_losses

    generator = torch.Generator().manual_seed(3)
    rejected_count = 1 if loss == "simpo" else 3
    means = -torch.rand(5, 1 + rejected_count, generator=generator, dtype=torch.float64) * 4 - 0.05
    config = PreferenceLossConfig(loss, beta=0.7, gamma=0.2 if loss in ("logo", "simpo") else 0.0,
                                  sft_weight=0.4, num_rejected=rejected_count)
    got = preference_losses(means, config)["loss"]
    for row, value in zip(means.tolist(), got.tolist()):
        want = naive_loss(loss, row[0], row[1:], 0.7, config.gamma, 0.4)
        assert abs(value - want) <= 1e-12 * max(1.0, abs(want)), (loss, value, want)


def test_preference_runs_get_logo_optimiser_defaults(pref_data, demo_data):
    prefix, hf_dir, _ = pref_data
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "2048", "--max-position-embeddings", "8192", "--data-path", prefix,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir]
    training = finalize(base).training
    assert (training.adam_beta2, training.weight_decay) == (0.999, 0.05)
    explicit = finalize([*base, "--adam-beta2", "0.98", "--weight-decay", "0"]).training
    assert (explicit.adam_beta2, explicit.weight_decay) == (0.98, 0.0)
    text_prefix, spm = demo_data[0].split()[1], demo_data[1]
    pretraining = finalize(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
                            "4", "--seq-length", "256", "--data-path", text_prefix,
                            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                            spm]).training
    assert (pretraining.adam_beta2, pretraining.weight_decay) == (0.95, 0.01)


def hf_reference_losses(hf_dir, records, beta, gamma, sft_weight, loss="logo"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    totals = {"loss": [], "pref_loss": [], "sft_loss": []}
    with torch.no_grad():
        for record in records:
            means = []
            for name in ["chosen"] + [f"rejected_{j}" for j in range(1, NUM_REJECTED + 1)]:
                branch = record[name]
                ids = torch.tensor([branch["input_ids"]])
                logits = model(input_ids=ids, position_ids=torch.tensor([branch["position_ids"]])
                               ).logits[0].double()
                labels = torch.tensor(branch["labels"][1:])  # logit t-1 predicts token t
                scored = labels != -100
                log_probs = logits[:-1].log_softmax(-1)[scored].gather(
                    1, labels[scored].view(-1, 1))
                means.append(log_probs.mean())
            chosen, rejected = means[0].item(), [m.item() for m in means[1:]]
            total = naive_loss(loss, chosen, rejected, beta, gamma, sft_weight)
            totals["pref_loss"].append(total + sft_weight * chosen)
            totals["sft_loss"].append(-chosen)
            totals["loss"].append(total)
    return {k: float(np.mean(v)) for k, v in totals.items()}


def first_iteration_and_batches(flags, load, tmp_path, num_samples=2):
    """(iteration-1 metrics of a --finetune run from ``load``, the batches inspect_batches.py
    dumps for the same flags): what a transformers reference recomputes independently."""
    metrics = tmp_path / "metrics.jsonl"
    torchrun(1, [*flags, "--load", load, "--finetune", "--train-iters", "1",
                 "--metrics-jsonl", str(metrics)], timeout=900)
    dump = tmp_path / "batches.jsonl"
    run([sys.executable, f"{REPO_ROOT}/tools/inspect_batches.py", *flags, "--num-samples",
         str(num_samples), "--output", dump])
    return (read_metrics(str(metrics))[0],
            [json.loads(line) for line in dump.read_text().splitlines()])


@pytest.mark.multiprocess
@pytest.mark.parametrize("loss", ["logo", "orpo"])
def test_loss_matches_transformers(pref_data, smollm2_megatron, tmp_path, loss):
    prefix, hf_dir, longest = pref_data
    seq = round_up(longest["shared-prefix"])
    margin = ["--gamma-beta-ratio", "0.1"] if loss == "logo" else []
    flags = [*smollm2_megatron["flags"], "--data-path", prefix, "--tokenizer-type",
             "HuggingFaceTokenizer", "--tokenizer-model", hf_dir, "--seq-length", str(seq),
             "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-6",
             "--position-scheme", "logo", "--target-seq-length", str(TARGET), "--device", "cpu",
             "--split", "100,0,0", "--preference-loss", loss, "--beta", "2.5", *margin,
             "--sft-weight", "0.3"]
    ours, records = first_iteration_and_batches(flags, smollm2_megatron["mg"], tmp_path)
    reference = hf_reference_losses(hf_dir, records, beta=2.5,
                                    gamma=0.25 if loss == "logo" else 0.0, sft_weight=0.3,
                                    loss=loss)
    print("ours", {k: ours[k] for k in ("loss", "pref_loss", "sft_loss")}, "transformers", reference)
    assert ours["loss_tokens"] == 2  # rows, the loss's denominator
    assert rel_diff(ours["loss"], reference["loss"]) <= 1e-5
    assert rel_diff(ours["pref_loss"], reference["pref_loss"]) <= 1e-5
    assert rel_diff(ours["sft_loss"], reference["sft_loss"]) <= 1e-5
    # The rows really carry synthesised long positions.
    assert max(max(r["chosen"]["position_ids"]) for r in records) > 2 * seq


# ------------------------------------------------------------------------------------------------
# Parallel layouts and packings
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(pref_data, tmp_path_factory):
    prefix, hf_dir, longest = pref_data
    root = tmp_path_factory.mktemp("preference-runs")
    args = list(TINY_MODEL)
    args[args.index("--seq-length") + 1] = str(round_up(longest["separate"]))
    args += ["--max-position-embeddings",
             "8192", "--data-path", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
             "--tokenizer-model", hf_dir, "--position-scheme", "logo", "--split", "100,0,0"]
    init = save_initial_checkpoint(root, args)
    return root, init, args


LAYOUTS = {
    "separate": (1, ["--preference-packing", "separate"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2": (2, ["--use-distributed-optimizer"]),
}


@pytest.mark.multiprocess
def test_layouts_and_packings_give_the_same_losses(tiny_run):
    root, init, args = tiny_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = run_from(init, root, "single", 1, [*args, "--tensorboard-dir", str(root / "tb")])
    assert len(base) == 3
    events = EventAccumulator(str(root / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for metric in ("pref_loss", "sft_loss", "rewards/chosen", "rewards/rejected", "margin",
                   "accuracy"):
        assert all(np.isfinite(r[metric]) for r in base), metric
        assert f"train/{metric}" in tags, (metric, sorted(tags))
    for name, (nproc, extra) in LAYOUTS.items():
        records = run_from(init, root, name, nproc, [*args, *extra])
        for ours, ref in zip(records, base, strict=True):
            assert rel_diff(ours["loss"], ref["loss"]) <= 1e-4, (name, ours["loss"], ref["loss"])
            assert rel_diff(ours["grad_norm"], ref["grad_norm"]) <= 1e-4, name
            assert ours["loss_tokens"] == ref["loss_tokens"] == 4


@pytest.mark.multiprocess
def test_shared_prefix_gradients_equal_separate(tiny_run):
    root, init, args = tiny_run
    out = root / "grads.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(__import__("launch").free_port()),
           f"{REPO_ROOT}/tests/preference_grad_worker.py", *args, "--train-iters", "2",
           "--load", init, "--finetune", str(out)]
    run(cmd, timeout=600)
    result = json.loads(out.read_text())
    print(result)
    assert result["params_with_grad"] == result["params"]
    assert rel_diff(result["shared-prefix"]["preference loss"],
                    result["separate"]["preference loss"]) <= 1e-5
    assert result["max_rel_grad_diff"] <= 1e-5


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def finalize(argv):
    from megatron_ext import arguments

    args = arguments.build_parser().parse_args(argv)
    return arguments.finalize(args, world_size=1)


def test_bad_flags_are_refused_early(pref_data, demo_data):
    from megatron_ext.arguments import ArgumentError

    prefix, hf_dir, longest = pref_data
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "2048", "--max-position-embeddings", "8192", "--data-path", prefix,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir]
    cfg = finalize(base)
    options = cfg.objective.options
    assert cfg.objective.name == "preference" and options.preference_loss == "logo"
    assert (options.beta, options.gamma, options.sft_weight) == (10.0, 3.0, 0.1)
    assert finalize([*base, "--beta", "2", "--gamma", "0.7"]).objective.options.gamma == 0.7
    for extra, message in (
            (["--preference-loss", "simpo", "--num-rejected", "2"], "--num-rejected 1"),
            (["--objective", "sft"], "--objective sft"),
            (["--position-scheme", "longrecipe"], "contiguous or logo"),
            (["--beta", "0"], "--beta"),
            (["--packed-documents"], "--packed-documents"),
            (["--preference-loss", "orpo", "--gamma", "0.5"], "has no reward margin"),
            (["--preference-loss", "sft-only", "--beta", "2"], "drop --beta"),
            (["--document-packing", "whole"], "--preference-packing")):
        with pytest.raises(ArgumentError, match=re.escape(message)):
            finalize([*base, *extra])
    text_prefix, spm = demo_data[0].split()[1], demo_data[1]
    with pytest.raises(ArgumentError, match="--position-scheme logo"):
        finalize(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                  "--seq-length", "256", "--data-path", text_prefix, "--tokenizer-type",
                  "SentencePieceTokenizer", "--tokenizer-model", spm, "--position-scheme", "logo"])


def test_rows_that_do_not_fit_are_an_error(pref_data, tmp_path):
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.objectives import datasets_for

    prefix, hf_dir, longest = pref_data
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--max-position-embeddings", "8192", "--data-path", prefix, "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", hf_dir, "--split", "100,0,0"]
    short = finalize([*base, "--seq-length", str(longest["shared-prefix"] - 1)])
    with pytest.raises(ValueError, match="do not fit --seq-length"):
        datasets_for(short, tokenizer, [4, 0, 0])
    fits = finalize([*base, "--seq-length", str(longest["shared-prefix"])])
    assert datasets_for(fits, tokenizer, [4, 0, 0])[0] is not None
    too_many = finalize([*base, "--seq-length", str(longest["separate"]), "--num-rejected", "3"])
    with pytest.raises(ValueError, match="--num-rejected 3"):
        datasets_for(too_many, tokenizer, [4, 0, 0])


@pytest.mark.multiprocess
def test_resume_continues_the_preference_run_exactly(tiny_run):
    """Stop after iteration 2 (--exit-interval), resume from its checkpoint: iterations 3-4 equal
    the uninterrupted run's (the row order and LOGO positions are functions of the sample index)."""
    root, init, args = tiny_run
    full = run_from(init, root, "full4", 1, [*args, "--seed", "7"], iters=4)
    save = root / "resumed"
    common = [*args, "--seed", "7", "--train-iters", "4", "--save", str(save),
              "--save-interval", "2"]
    torchrun(1, [*common, "--load", init, "--finetune", "--exit-interval", "2",
                 "--metrics-jsonl", str(root / "part1.jsonl")])
    torchrun(1, [*common, "--load", str(save), "--metrics-jsonl", str(root / "part2.jsonl")])
    resumed = read_metrics(str(root / "part1.jsonl")) + read_metrics(str(root / "part2.jsonl"))
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    for ours, ref in zip(resumed, full, strict=True):
        assert ours["loss"] == ref["loss"] and ours["grad_norm"] == ref["grad_norm"], ours


@pytest.mark.gpu
@pytest.mark.multiprocess
def test_preference_step_on_gpu_matches_cpu(tiny_run):
    """CUDA + NCCL, fp32, our attention with branch masks: the first loss equals the CPU run's."""
    root, init, args = tiny_run
    gpu = list(args)
    gpu[gpu.index("--device") + 1] = "cuda"
    first = {}
    for name, flags in (("cpu", args), ("gpu", [*gpu, "--transformer-impl", "local"])):
        first[name] = run_from(init, root, f"{name}-first", 1,
                               [*flags, "--lr-warmup-iters", "0", "--attention-block-size", "256"],
                               iters=1)[0]
    assert rel_diff(first["gpu"]["loss"], first["cpu"]["loss"]) <= 1e-4
    assert first["gpu"]["loss_tokens"] == first["cpu"]["loss_tokens"] == 4


# ------------------------------------------------------------------------------------------------
# DPO / IPO with offline reference log-probs
# ------------------------------------------------------------------------------------------------

def reference_logps(nproc, args, load, output, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "tools/reference_logps.py", *args, "--load", load,
           "--output", output, "--no-progress", *extra]
    run(cmd, timeout=900)
    with np.load(output) as saved:
        return saved["sums"].copy(), saved["counts"].copy()


@pytest.fixture(scope="module")
def dpo_setup(tiny_run):
    """Contiguous-position runs; a second model (the start trained 2 iterations) as reference."""
    root, init, args = tiny_run
    args = [*args[:args.index("--position-scheme")], *args[args.index("--position-scheme") + 2:]]
    reference_ckpt = str(root / "dpo-reference")
    torchrun(1, [*args, "--train-iters", "2", "--load", init, "--finetune", "--lr", "1e-2",
                 "--save", reference_ckpt])
    files = {name: str(root / f"{name}.npz") for name in ("policy", "reference")}
    policy = reference_logps(1, args, init, files["policy"])
    reference = reference_logps(1, args, reference_ckpt, files["reference"])
    return root, init, args, files, policy, reference


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--context-parallel-size", "2"],
                                    ["--pipeline-model-parallel-size", "2"]])
def test_reference_logps_are_layout_invariant(dpo_setup, layout, tmp_path):
    _, init, args, _, (sums, counts), _ = dpo_setup
    other, other_counts = reference_logps(2, args, init, str(tmp_path / "layout.npz"), layout)
    assert (other_counts == counts).all() and (counts > 0).all()
    assert np.abs(other - sums).max() <= 1e-6 * np.abs(sums).max(), layout


def naive_reference_loss(loss, policy, reference, beta):
    """One row's DPO / IPO loss from (sums, counts) of policy and reference, from TRL's formulas."""
    import math

    (p_sums, counts), (r_sums, _) = policy, reference
    if loss == "dpo":
        ratios = [p - r for p, r in zip(p_sums, r_sums)]
        h = beta * (ratios[0] - sum(ratios[1:]) / len(ratios[1:]))
        return math.log1p(math.exp(-h))
    ratios = [(p - r) / n for p, r, n in zip(p_sums, r_sums, counts)]
    h = ratios[0] - sum(ratios[1:]) / len(ratios[1:])
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.multiprocess
@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_dpo_and_ipo_losses_follow_the_offline_reference(dpo_setup, tmp_path, loss):
    root, init, args, files, policy, reference = dpo_setup
    flags = [*args, "--preference-loss", loss, "--beta", "0.5", "--reference-logps",
             files["reference"], "--global-batch-size", "4", "--lr-warmup-iters", "0"]
    metrics = run_from(init, tmp_path, loss, 1, flags, iters=1)[0]
    dump = tmp_path / "batches.jsonl"
    run([sys.executable, f"{REPO_ROOT}/tools/inspect_batches.py", *flags, "--num-samples", "4",
         "--output", dump])
    rows = [json.loads(line)["row"] for line in dump.read_text().splitlines()]
    want = np.mean([naive_reference_loss(loss, (policy[0][r], policy[1][r]),
                                         (reference[0][r], reference[1][r]), 0.5) for r in rows])
    print(loss, "ours", metrics["loss"], "naive", want)
    assert rel_diff(metrics["loss"], want) <= 1e-5
    assert abs(want - math.log(2)) > 1e-3  # the reference really differs from the policy


def test_reference_files_are_checked(dpo_setup, pref_data, tmp_path):
    from megatron_ext.errors import ArgumentError

    root, init, args, files, policy, _ = dpo_setup
    base = [*args, "--train-iters", "1", "--lr-warmup-iters", "0"]
    with pytest.raises(ArgumentError, match="tools/reference_logps.py"):
        finalize([*base, "--preference-loss", "dpo"])
    with pytest.raises(ArgumentError, match="--position-scheme contiguous"):
        finalize([*base, "--preference-loss", "dpo", "--reference-logps", files["policy"],
                  "--position-scheme", "logo", "--target-seq-length", str(TARGET)])
    with pytest.raises(ArgumentError, match="--preference-loss dpo / ipo"):
        finalize([*base, "--reference-logps", files["policy"]])
    # A file computed for other data (another content fingerprint) is refused.
    sums, counts = policy
    from megatron_ext.objectives import reference_logps as ref

    other = tmp_path / "other.npz"
    ref.save(str(other), sums, counts, "0" * 32 + ":1", NUM_REJECTED)
    with pytest.raises(ArgumentError, match="another dataset"):
        finalize([*base, "--preference-loss", "dpo", "--reference-logps", str(other)])
    assert finalize([*base, "--preference-loss", "dpo", "--reference-logps",
                     files["policy"]]).objective.options.reference_logps == files["policy"]


def test_weighted_blend_of_preference_datasets(pref_data, tmp_path):
    from megatron_ext.data.gpt_data import build_preference_datasets
    from megatron_ext.data.preference_samples import blend_assignment
    from megatron_ext.data.tokenizer import build_tokenizer

    prefix, hf_dir, longest = pref_data
    # A second dataset: the same rows preprocessed again under another name.
    other = tmp_path / "copy_preference_document"
    for ext in (".bin", ".idx", "_tokenflags.bin", "_tokenflags.idx", "_meta.json"):
        source = prefix + ext
        if os.path.exists(source):
            shutil.copyfile(source, str(other) + ext)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    options = dict(split="100,0,0", seq_length=round_up(longest["shared-prefix"]),
                   num_rejected=NUM_REJECTED, packing="shared-prefix",
                   position_scheme="contiguous", target_seq_length=TARGET, seed=5)
    blend, _, _ = build_preference_datasets(([prefix, str(other)], [3.0, 1.0]), tokenizer,
                                            [40, 0, 0], **options)
    alone, _, _ = build_preference_datasets(([prefix], None), tokenizer, [40, 0, 0], **options)
    sources = [blend.dataset_of(i) for i in range(40)]
    # Every prefix of the samples follows the 3:1 weights to within one sample ...
    for n in range(1, 41):
        assert abs(sources[:n].count(prefix) - 0.75 * n) <= 1, n
    # ... and the first dataset's samples are its own samples, in its own order.
    first = [i for i in range(40) if sources[i] == prefix]
    for k, i in enumerate(first[:6]):
        assert np.array_equal(blend[i]["tokens"], alone[k]["tokens"])
    assert list(blend_assignment([1, 1], 4)[0]) == [0, 1, 0, 1]


def hf_answer_log_prob_sums(model, record, names):
    """Per answer of a dumped row: (sum of the answer tokens' log-probs, token count), fp64 from an
    fp32 transformers forward of that branch's own sequence at its dumped positions."""
    out = []
    with torch.no_grad():
        for name in names:
            branch = record[name]
            logits = model(input_ids=torch.tensor([branch["input_ids"]]),
                           position_ids=torch.tensor([branch["position_ids"]])).logits[0].double()
            labels = torch.tensor(branch["labels"][1:])  # logit t-1 predicts token t
            scored = labels != -100
            log_probs = logits[:-1].log_softmax(-1)[scored].gather(1, labels[scored].view(-1, 1))
            out.append((log_probs.sum().item(), int(scored.sum())))
    return out


@pytest.fixture(scope="module")
def two_short_rows(smollm2, tmp_path_factory):
    """Two SmolLM2-tokenized rows with short prompts (3 passages of 200 characters): every row the
    reference pass scores is also checked against transformers, at little SmolLM2 cost."""
    rows = make_preference_rows(num_rows=2, num_chunks=3, chunk_chars=200,
                                num_rejected=NUM_REJECTED, seed=5)
    root = tmp_path_factory.mktemp("preference-two-rows")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess_preference([str(root / "rows.jsonl")], str(root / "two"), "HuggingFaceTokenizer",
                          smollm2["hf"], progress=False)
    prefix = data_prefix_for(str(root / "two"))
    data = PreferenceRows(prefix)
    return prefix, smollm2["hf"], max(layout_length(*data.lengths(r, NUM_REJECTED),
                                                    "shared-prefix") for r in range(len(data)))


@pytest.mark.multiprocess
def test_reference_logps_and_dpo_loss_match_transformers(two_short_rows, smollm2_megatron,
                                                         tmp_path):
    """tools/reference_logps.py on SmolLM2 gives transformers' answer sums and counts on the rows
    tools/inspect_batches.py dumps; a DPO iteration 1 of a perturbed SmolLM2 (the policy) against
    that file gives the loss of TRL's sigmoid DPO formula on transformers' sums of both models."""
    from transformers import AutoModelForCausalLM

    prefix, hf_dir, longest = two_short_rows
    # The policy: SmolLM2 with its final norm scaled per channel (seeded), saved and converted,
    # so the policy / reference log-ratios differ per answer and the loss is not log 2.
    reference_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    policy_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        norm = policy_model.model.norm.weight
        norm.mul_(1 + 0.3 * torch.randn(norm.shape, generator=torch.Generator().manual_seed(0)))
    policy_hf, policy_mg = tmp_path / "policy-hf", tmp_path / "policy-mg"
    policy_model.save_pretrained(policy_hf)
    run([sys.executable, f"{REPO_ROOT}/tools/convert_checkpoint.py", "hf-to-megatron",
         "--hf-dir", policy_hf, "--megatron-dir", policy_mg, "--dtype", "fp32", "--no-progress"],
        timeout=600)

    flags = [*smollm2_megatron["flags"], "--data-path", prefix, "--tokenizer-type",
             "HuggingFaceTokenizer", "--tokenizer-model", hf_dir,
             "--seq-length", str(round_up(longest)), "--micro-batch-size", "1",
             "--global-batch-size", "2", "--device", "cpu", "--split", "100,0,0",
             "--position-scheme", "contiguous", "--num-rejected", "1"]
    reference_file = str(tmp_path / "reference.npz")
    sums, counts = reference_logps(1, flags, smollm2_megatron["mg"], reference_file)
    assert sums.shape == (2, 2)  # 2 rows: chosen and the first rejected answer
    beta = 0.5
    dpo = [*flags, "--preference-loss", "dpo", "--beta", str(beta), "--reference-logps",
           reference_file, "--lr", "1e-6", "--lr-warmup-iters", "0"]
    ours, records = first_iteration_and_batches(dpo, str(policy_mg), tmp_path)
    assert sorted(r["row"] for r in records) == [0, 1]  # every row of the file is checked

    losses = []
    for record in records:
        row = record["row"]
        reference = hf_answer_log_prob_sums(reference_model, record, ["chosen", "rejected_1"])
        policy = hf_answer_log_prob_sums(policy_model, record, ["chosen", "rejected_1"])
        # The positions really are contiguous (the file's premise).
        assert record["chosen"]["position_ids"] == list(range(len(record["chosen"]["input_ids"])))
        for k, (ref_sum, ref_count) in enumerate(reference):
            print("row", row, "answer", k, "file", sums[row, k], counts[row, k],
                  "transformers", ref_sum, ref_count)
            assert counts[row, k] == ref_count > 0
            assert rel_diff(sums[row, k], ref_sum) <= 1e-5, (row, k, sums[row, k], ref_sum)
        # TRL's sigmoid DPO loss: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).
        logits = beta * ((policy[0][0] - reference[0][0]) - (policy[1][0] - reference[1][0]))
        losses.append(-math.log(1 / (1 + math.exp(-logits))))
    want = float(np.mean(losses))
    print("DPO iteration 1: ours", ours["loss"], "transformers", want)
    assert ours["loss_tokens"] == 2  # rows, the loss's denominator
    assert abs(want - math.log(2)) > 1e-2  # the policy really differs from the reference
    assert rel_diff(ours["loss"], want) <= 1e-5
