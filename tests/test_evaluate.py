"""Long-context evaluation (``python -m megatron_ext.evaluate``) on SmolLM2-135M-Instruct converted
to an fp32 Megatron checkpoint, against transformers on the same tokens:

- ppl-by-position at 1K and 2K equals transformers' loss on the same windows (<= 1e-4 relative),
  single process and under context parallelism (CP=2, two ranks on gloo);
- passkey at 1K and 2K: greedy answers equal transformers' greedy ``generate`` on the same prompts,
  token for token; CP=2 gives the same per-sample answers; the accuracy is printed;
- TP=2 x PP=2 (four ranks) on a small random Llama with padded vocabulary rows: loss and greedy
  answers equal transformers';
- haystacks: exact length, needle text and depth verified by decoding, filler is corpus text;
- the training hook runs the tasks on an in-memory (DDP-wrapped) model and logs them.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from launch import REPO_ROOT, free_port, rel_diff, run

pytest_plugins = ("evaluate_fixtures",)  # smollm2, smollm2_megatron, eval_jsonl, novels_jsonl

LENGTHS = [1024, 2048]
DEPTHS = [0.25, 0.75]
NUM_SAMPLES = 1  # ppl: documents per length; passkey: haystacks per (length, depth)
SEED = 1234
EVAL_FLAGS = ["--tasks", "ppl-by-position,passkey", "--lengths", ",".join(map(str, LENGTHS)),
              "--depths", ",".join(map(str, DEPTHS)), "--num-samples", str(NUM_SAMPLES),
              "--seed", str(SEED), "--chat-template", "--no-progress", "--device", "cpu"]


def evaluate(model: dict, data: str, out: str, nproc: int = 1, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "megatron_ext.evaluate", *model["flags"],
           "--load", model["mg"], "--tokenizer-type", "HuggingFaceTokenizer",
           "--tokenizer-model", model["hf"], "--eval-data", data, "--output", out,
           *EVAL_FLAGS, *extra]
    # Two cores: one process gets both, two processes one each.
    proc = run(cmd, timeout=900, env={"OMP_NUM_THREADS": str(max(1, 2 // nproc))})
    with open(os.path.join(out, "results.json")) as f:
        return {"results": json.load(f), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def runs(smollm2_megatron, eval_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-runs")
    return {
        "single": evaluate(smollm2_megatron, eval_jsonl, str(root / "single")),
        "cp2": evaluate(smollm2_megatron, eval_jsonl, str(root / "cp2"), nproc=2,
                        extra=["--context-parallel-size", "2"]),
        "out": root,
    }


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from megatron_ext.data.tokenizer import build_tokenizer

    return build_tokenizer("HuggingFaceTokenizer", smollm2["hf"])


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2["hf"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_ppl(hf_model, eval_jsonl, tokenizer):
    """transformers' mean next-token loss over the windows ppl-by-position evaluates."""
    from megatron_ext.evaluate.corpus import EvalCorpus
    from megatron_ext.evaluate.ppl_by_position import select_windows

    corpus = EvalCorpus(eval_jsonl, tokenizer)
    out = {}
    for length in LENGTHS:
        windows, documents, skipped = select_windows(corpus, length, NUM_SAMPLES)
        total, count, per_doc = 0.0, 0, []
        with torch.no_grad():
            for window in windows:
                ids = torch.as_tensor(window).view(1, -1)
                logits = hf_model(ids).logits[0, :-1].double()
                losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                total, count = total + losses.sum().item(), count + losses.numel()
                per_doc.append(losses.mean().item())
        out[str(length)] = {"loss": total / count, "per_document": per_doc,
                            "documents": documents, "skipped": skipped}
    return out


@pytest.fixture(scope="module")
def hf_passkey(hf_model, eval_jsonl, tokenizer):
    """transformers' greedy ``generate`` on the same passkey prompts (rebuilt from the seed)."""
    from megatron_ext.evaluate.corpus import EvalCorpus
    from megatron_ext.evaluate.haystack import HaystackBuilder

    builder = HaystackBuilder(EvalCorpus(eval_jsonl, tokenizer), tokenizer, SEED,
                              chat_template=True)
    out = {}
    for length in LENGTHS:
        rows = []
        for sample in builder.build_all("passkey", length, DEPTHS, NUM_SAMPLES):
            prompt = torch.as_tensor(sample.tokens[:sample.answer_start]).view(1, -1)
            n = len(sample.answer_tokens)
            with torch.no_grad():
                generated = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                              pad_token_id=tokenizer.eod)
            rows.append({"sample": sample, "generated": generated[0, prompt.shape[1]:].tolist()})
        out[str(length)] = rows
    return out


def test_eval_corpus_covers_the_lengths(eval_jsonl, tokenizer):
    """The fixture itself: two documents of 1K-2K tokens, one short, one over 2K."""
    from megatron_ext.evaluate.corpus import EvalCorpus

    corpus = EvalCorpus(eval_jsonl, tokenizer)
    lengths = [corpus.document_length(i) for i in range(len(corpus))]
    assert corpus.skipped_empty == 1 and len(lengths) == 4
    assert all(1024 <= n < 2048 for n in (lengths[0], lengths[3]))
    assert lengths[1] < 1024 and lengths[2] >= 2048


@pytest.mark.multiprocess
def test_ppl_by_position_matches_transformers(runs, hf_ppl):
    for name in ("single", "cp2"):
        by_length = runs[name]["results"]["tasks"]["ppl-by-position"]
        for length in map(str, LENGTHS):
            ours, ref = by_length[length], hf_ppl[length]
            rel = rel_diff(ours["loss"], ref["loss"])
            print(f"{name} ppl-by-position {length}: megatron {ours['loss']:.7f} transformers "
                  f"{ref['loss']:.7f} rel {rel:.2e} ({ours['documents']} docs, "
                  f"{ours['skipped_short']} skipped)")
            assert rel <= 1e-4
            assert ours["document_indices"] == ref["documents"]
            assert ours["skipped_short"] == ref["skipped"]
            assert ours["tokens"] == ours["documents"] * (int(length) - 1)
            for got, want in zip(ours["per_document_loss"], ref["per_document"], strict=True):
                assert rel_diff(got, want) <= 1e-4
            # Buckets partition the predicted tokens; their token-weighted mean is the loss.
            buckets = ours["buckets"]
            assert sum(b["tokens"] for b in buckets) == ours["tokens"]
            weighted = sum(b["loss"] * b["tokens"] for b in buckets) / ours["tokens"]
            assert rel_diff(weighted, ours["loss"]) <= 1e-9
    # 2K: the medium and the short document before the long one are skipped and counted.
    two_k = runs["single"]["results"]["tasks"]["ppl-by-position"]["2048"]
    assert two_k["document_indices"] == [2] and two_k["skipped_short"] == 2


@pytest.mark.multiprocess
def test_passkey_greedy_answers_match_transformers(runs, hf_passkey, tokenizer):
    records = runs["single"]["results"]["tasks"]["passkey"]
    for length in map(str, LENGTHS):
        ours, ref = records[length]["per_sample"], hf_passkey[length]
        assert len(ours) == len(ref) == len(DEPTHS) * NUM_SAMPLES
        for got, want in zip(ours, ref, strict=True):
            sample, generated = want["sample"], want["generated"]
            # The run evaluated the haystack rebuilt here (same seed -> same sample).
            assert (got["depth"], got["index"]) == (sample.depth, sample.index)
            assert got["needle_start"] == sample.needle_start
            assert got["filler_source"] == list(sample.filler_source)
            # Greedy decoding, token for token, up to the first wrong token.
            assert generated[:len(got["greedy_tokens"])] == got["greedy_tokens"]
            assert got["correct"] == (generated == sample.answer_tokens.tolist())
            print(f"passkey {length} depth {got['depth']}: expected {got['expected']!r}, "
                  f"transformers {tokenizer.detokenize(generated)!r}, megatron greedy "
                  f"{got['greedy']!r}")
    accuracy = {n: records[n]["accuracy"] for n in records}
    total = sum(records[n]["correct"] for n in records)
    print(f"passkey accuracy of SmolLM2-135M-Instruct: {accuracy} ({total} of "
          f"{sum(records[n]['samples'] for n in records)} samples)")
    assert total > 0, "the model retrieved no passkey at all: the task or the scoring is broken"


@pytest.mark.multiprocess
def test_context_parallel_gives_identical_answers(runs):
    single, cp2 = (runs[k]["results"]["tasks"]["passkey"] for k in ("single", "cp2"))
    for length in map(str, LENGTHS):
        keys = ("depth", "index", "correct", "greedy_tokens", "needle_start", "filler_source")
        assert [{k: r[k] for k in keys} for r in cp2[length]["per_sample"]] == \
               [{k: r[k] for k in keys} for r in single[length]["per_sample"]]
        for a, b in zip(cp2[length]["per_sample"], single[length]["per_sample"], strict=True):
            assert abs(a["answer_loss"] - b["answer_loss"]) <= 1e-4 * max(1.0, b["answer_loss"])
    assert runs["cp2"]["results"]["config"]["layout"] == {"tp": 1, "pp": 1, "cp": 2, "dp": 1}


@pytest.mark.multiprocess
def test_results_files_and_summary(runs):
    from PIL import Image

    out = runs["out"] / "single"
    results = runs["single"]["results"]
    assert set(results["tasks"]) == {"ppl-by-position", "passkey"}
    for task, key in (("ppl-by-position", "loss"), ("passkey", "accuracy")):
        assert set(results["tasks"][task]) == {str(n) for n in LENGTHS}
        assert all(isinstance(v[key], float) for v in results["tasks"][task].values())
    config = results["config"]
    assert config["lengths"] == LENGTHS and config["depths"] == DEPTHS
    assert config["seed"] == SEED and config["corpus"]["skipped_empty_rows"] == 1
    assert config["model"]["padded_vocab_size"] == 49152
    for png in ("ppl_by_position.png", "passkey.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 100
        assert png in results["plots"]
    stdout = runs["single"]["stdout"]
    assert "passkey exact match" in stdout and "ppl-by-position loss" in stdout
    assert str(out / "results.json") in stdout


@pytest.fixture(scope="module")
def tiny_random_llama(smollm2, tmp_path_factory):
    """A 2-layer random Llama (GQA 4/2) converted to Megatron, run with SmolLM2's tokenizer. Its
    embedding has 49200 rows (49280 after Megatron's padding) for a 49152-token tokenizer, so
    greedy answers must skip the rows no token decodes to."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("evaluate-tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49200, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "hf")
    mg = root / "mg"
    run([sys.executable, f"{REPO_ROOT}/tools/convert_checkpoint.py", "hf-to-megatron",
         "--hf-dir", root / "hf", "--megatron-dir", mg, "--dtype", "fp32", "--no-progress"])
    return {"hf": smollm2["hf"], "hf_model": str(root / "hf"), "mg": str(mg),
            "flags": (mg / "megatron_args.txt").read_text().split()}


@pytest.mark.multiprocess
def test_tensor_and_pipeline_parallel_match_transformers(tiny_random_llama, eval_jsonl, tokenizer,
                                                         tmp_path):
    """TP=2 x PP=2 (vocab-parallel argmax and loss, pipeline schedule) against transformers."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.evaluate.corpus import EvalCorpus
    from megatron_ext.evaluate.haystack import HaystackBuilder
    from megatron_ext.evaluate.ppl_by_position import select_windows

    length, depths, samples = 256, [0.3, 0.8], 2
    results = evaluate(tiny_random_llama, eval_jsonl, str(tmp_path / "tp2pp2"), nproc=4, extra=[
        "--tasks", "ppl-by-position,passkey,niah-multikey", "--lengths", str(length),
        "--depths", ",".join(map(str, depths)), "--num-samples", str(samples),
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])["results"]
    assert results["config"]["layout"] == {"tp": 2, "pp": 2, "cp": 1, "dp": 1}
    assert results["config"]["model"]["padded_vocab_size"] == 49280

    model = AutoModelForCausalLM.from_pretrained(tiny_random_llama["hf_model"],
                                                 dtype=torch.float32).eval()
    corpus = EvalCorpus(eval_jsonl, tokenizer)
    windows, _, _ = select_windows(corpus, length, samples)
    with torch.no_grad():
        logits = model(torch.as_tensor(np.stack(windows))).logits[:, :-1].double()
        targets = torch.as_tensor(np.stack(windows))[:, 1:]
        hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    ours = results["tasks"]["ppl-by-position"][str(length)]
    assert ours["documents"] == samples and rel_diff(ours["loss"], hf_loss) <= 1e-4

    builder = HaystackBuilder(corpus, tokenizer, SEED, chat_template=True)
    for task in ("passkey", "niah-multikey"):
        records = results["tasks"][task][str(length)]["per_sample"]
        haystacks = builder.build_all(task, length, depths, samples)
        for record, sample in zip(records, haystacks, strict=True):
            with torch.no_grad():
                out = model(torch.as_tensor(sample.tokens).view(1, -1)).logits[0]
            # Teacher-forced argmax over the tokens the tokenizer has (not the extra rows).
            argmax = out[sample.answer_start - 1:-1, :49152].argmax(-1).tolist()
            greedy = record["greedy_tokens"]
            assert greedy == argmax[:len(greedy)]
            assert record["correct"] == (argmax == sample.answer_tokens.tolist())


# ------------------------------------------------------------------------------------------
# Haystacks, without a model
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["passkey", "niah", "niah-multikey"])
def test_haystack_length_needle_and_depth_by_decoding(task, novels_jsonl, tokenizer):
    from megatron_ext.evaluate.corpus import EvalCorpus
    from megatron_ext.evaluate.haystack import SENTENCE_ENDS, HaystackBuilder, depth_tolerance

    corpus = EvalCorpus(novels_jsonl, tokenizer)
    builder = HaystackBuilder(corpus, tokenizer, seed=7)
    depths = [0.0, 0.1, 0.5, 0.9, 1.0]
    for length in (512, 3000):
        for sample in builder.build_all(task, length, depths, 1):
            tokens = sample.tokens
            assert len(tokens) == length
            decode = tokenizer.detokenize
            text = decode(tokens.tolist())
            needle = decode(tokens[sample.needle_start:sample.needle_start
                                   + sample.needle_length].tolist())
            assert needle == sample.needle_text and sample.answer in needle
            # Exactly where the sample says, and only there.
            assert text.count(needle) == 1
            assert text.index(needle) == len(decode(tokens[:sample.needle_start].tolist()))
            assert abs(sample.actual_depth - sample.depth) <= depth_tolerance(sample)
            # Placed after a sentence end, unless at an edge of the context.
            before = decode(tokens[sample.context_start:sample.needle_start].tolist())
            at_end = sample.needle_start + sample.needle_length == sample.context_end
            assert before == "" or at_end or before.rstrip(" ").endswith(SENTENCE_ENDS)
            # The answer closes the sequence, right after the question.
            assert decode(sample.answer_tokens.tolist()) == " " + sample.answer
            assert text.endswith("is " + sample.answer)
            # The question comes after the context, and names the needle's key.
            question = decode(tokens[sample.context_end:sample.answer_start].tolist())
            key = needle.split(" for ")[1].split(" is:")[0] if task != "passkey" else "pass key"
            assert key in question
            needles = text.count("special magic numbers for") if task != "passkey" \
                else text.count("The pass key is")
            assert needles == (4 if task == "niah-multikey" else 1) + (task == "passkey")
            if task != "niah-multikey":
                # Everything else in the context is one contiguous run of the novel's tokens.
                context = np.concatenate([tokens[sample.context_start:sample.needle_start],
                                          tokens[sample.needle_start + sample.needle_length:
                                                 sample.context_end]])
                doc, start = sample.filler_source
                assert np.array_equal(context, corpus.tokens(doc)[start:start + len(context)])
    # Deterministic from the seed; another seed, another haystack.
    again = HaystackBuilder(EvalCorpus(novels_jsonl, tokenizer), tokenizer, seed=7)
    other = HaystackBuilder(corpus, tokenizer, seed=8)
    first = builder.build(task, 512, 0.5, 0)
    assert np.array_equal(again.build(task, 512, 0.5, 0).tokens, first.tokens)
    assert not np.array_equal(other.build(task, 512, 0.5, 0).tokens, first.tokens)


def test_haystack_chat_template_frames_the_prompt(novels_jsonl, tokenizer):
    from megatron_ext.evaluate.corpus import EvalCorpus
    from megatron_ext.evaluate.haystack import HaystackBuilder

    builder = HaystackBuilder(EvalCorpus(novels_jsonl, tokenizer), tokenizer, seed=1,
                              chat_template=True)
    sample = builder.build("passkey", 768, 0.5, 0)
    text = tokenizer.detokenize(sample.tokens.tolist())
    assert len(sample.tokens) == 768
    assert text.startswith("<|im_start|>system\n")
    assert f"<|im_end|>\n<|im_start|>assistant\nThe pass key is {sample.answer}" in text
    assert text.endswith(f"The pass key is {sample.answer}")


def test_bad_input_is_refused_early(smollm2_megatron, eval_jsonl, tmp_path, capsys):
    from megatron_ext.evaluate import cli

    base = [*smollm2_megatron["flags"], "--load", smollm2_megatron["mg"],
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", smollm2_megatron["hf"],
            "--eval-data", eval_jsonl, "--output", str(tmp_path / "out"), "--device", "cpu"]
    cases = [
        (["--tasks", "passkey,nope"], "unknown nope"),
        (["--lengths", "1K,x"], "'x' is not a token count"),
        (["--lengths", "16384"], "exceeds --max-position-embeddings (8192)"),
        (["--lengths", "1030", "--context-parallel-size", "2"], "must be divisible by 2 x"),
        (["--depths", "0.5,1.5"], "--depths must be fractions in [0, 1]"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--load", str(tmp_path)], "no latest_checkpointed_iteration.txt"),
        (["--eval-data", str(tmp_path / "missing.jsonl")], "no such jsonl file"),
        (["--tensor-model-parallel-size", "2"], "--num-attention-heads (9) must be divisible"),
        (["--keep-last-n-checkpoints", "2"], "--keep-last-n-checkpoints: evaluation writes no"),
        (["--async-save"], "--async-save: evaluation writes no checkpoint"),
    ]
    for extra, message in cases:
        args = cli.build_parser().parse_args([*base, *extra])
        with pytest.raises(ValueError) as err:
            cli.finalize(args, world_size=2)
        assert message in str(err.value), extra
    # The entry point: argparse's exit status 2 and the message, before any process group.
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--lengths", "16384"])
    assert exit_info.value.code == 2
    assert "exceeds --max-position-embeddings" in capsys.readouterr().err
    # A corpus row without text: the file and line named.
    from megatron_ext.evaluate.corpus import CorpusError, EvalCorpus

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=f"{bad}:2: expected an object with a string 'text'"):
        EvalCorpus(str(bad), tokenizer=None)


# ------------------------------------------------------------------------------------------
# During training
# ------------------------------------------------------------------------------------------

def test_training_hook_runs_tasks_on_the_in_memory_model(smollm2_megatron, eval_jsonl, hf_ppl,
                                                         tmp_path):
    metrics_file, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    proc = run([sys.executable, os.path.join(REPO_ROOT, "tests", "evaluate_hook_worker.py"),
                json.dumps({"model": smollm2_megatron, "data": eval_jsonl,
                            "metrics": str(metrics_file), "tensorboard": str(tb)})],
               env={"OMP_NUM_THREADS": "2", "MASTER_PORT": str(free_port())}, timeout=900)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = report["metrics"]
    assert set(metrics) == {"ppl-by-position/1024", "passkey/1024"}
    # The hook's ppl-by-position is transformers' loss on the same first document's window.
    assert rel_diff(metrics["ppl-by-position/1024"], hf_ppl["1024"]["per_document"][0]) <= 1e-4
    assert metrics["passkey/1024"] in (0.0, 1.0)
    assert report["training_mode_after"] is True
    (record,) = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert record == {"kind": "eval_tasks", "iteration": 7, **metrics}
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    assert "long-context eval at iteration 7 | ppl-by-position/1024:" in proc.stdout
