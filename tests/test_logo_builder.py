"""tools/build_logo_data.py: LOGO preference rows from real Austen QA rows and the real SmolLM2.

Chunk selection is checked against a naive recomputation in this file, generation and resuming
with the real model (a SIGKILLed subprocess, then a resume, must give byte-identical files), the
output through the real preference preprocessor. Cheap cases (bad input, drop reasons, settings
pinning, which prompt gives which answer) replace the model with an echoing fake.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dev import assets
from megatron_ext.commands import build_logo_data as cli
from megatron_ext.data import logo_builder, logo_generate
from dev.demo_preference import split_sentences
from megatron_ext.data.logo_features import lexical_features, stem
from megatron_ext.data.preprocess_preference import preprocess_preference

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHUNK_TOKENS, NUM_CHUNKS, MIN_OVERLAP, BATCH = 48, 4, 1, 2
FLAGS = ["--chunk-tokens", str(CHUNK_TOKENS), "--num-chunks", str(NUM_CHUNKS),
         "--min-overlap", str(MIN_OVERLAP), "--max-new-tokens", "8", "--batch-size", str(BATCH),
         "--keep-identical", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: OpenMP threads spinning against other workers make decoding 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2_dir():
    return str(assets.require(assets.smollm2_hf_dir))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def austen_qa(count):
    """QA rows over consecutive paragraphs of the first novel: "who is <name>?" for the name the
    context mentions most, gold answer = a sentence of the fourth paragraph."""
    with open(assets.require(assets.corpus_jsonl, "austen")) as f:
        text = json.loads(f.readline())["text"]
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if len(p) > 200]
    rows = []
    for r in range(count):
        ctx = paragraphs[10 + 12 * r: 16 + 12 * r]
        names = [w for w in re.findall(r"\b[A-Z][a-z]{3,}\b", " ".join(ctx))
                 if w not in ("When", "What", "They", "There", "This", "That", "With")]
        name = max(sorted(set(names)), key=names.count)
        rows.append({"context": "\n\n".join(ctx),
                     "question": f"According to the story, who is {name}?",
                     "answer": split_sentences(ctx[3])[0]})
    return rows


@pytest.fixture(scope="module")
def qa_rows():
    """Lines 1, 2, 5, 6 real rows; 3 shares no word with its context; 4 has too few chunks."""
    real = austen_qa(4)
    unrelated = dict(real[2], question="Xylophones quantise zebras?")
    short = dict(real[3], context=real[3]["context"][:150])
    return real[:2] + [unrelated, short] + real[2:]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory, qa_rows, smollm2_dir):
    root = tmp_path_factory.mktemp("logo")
    qa = write_jsonl(root / "qa.jsonl", qa_rows)
    out = root / "logo.jsonl"
    assert cli.main(["--input", qa, "--output", str(out), "--model", smollm2_dir] + FLAGS) == 0
    return qa, out


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- #
# Naive recomputation
# --------------------------------------------------------------------------- #

def naive_selection(tokenizer, row, k):
    ids = tokenizer(row["context"], add_special_tokens=False)["input_ids"]
    chunks = [tokenizer.decode(ids[i:i + CHUNK_TOKENS]).strip()
              for i in range(0, len(ids), CHUNK_TOKENS)]
    query = lexical_features(row["question"])
    scores = [len(query & lexical_features(c)) for c in chunks]
    left = [i for i, c in enumerate(chunks) if c]
    if len(left) < k:
        return chunks, scores, None
    picked = []
    for _ in range(k):                       # repeatedly take the best remaining chunk
        best = left[0]
        for i in left:
            if scores[i] > scores[best]:
                best = i
        picked.append(best)
        left.remove(best)
    return chunks, scores, picked             # best first


def test_lexical_features():
    feats = lexical_features("Mr. Darcy's sisters walked to the houses; they were walking home!")
    assert feats == {"mr", "darcy", "sister", "walk", "hous", "hom"}
    assert {stem(w) for w in ("loves", "loved", "loving", "love")} == {"lov"}
    assert stem("boxes") == "box" and stem("stories") == "story" and stem("glass") == "glass"


def test_rows_chunks_and_halves(built, qa_rows, tokenizer):
    qa, out = built
    rows = read(out)
    expected_lines = []
    for line, qa_row in enumerate(qa_rows, start=1):
        chunks, scores, picked = naive_selection(tokenizer, qa_row, NUM_CHUNKS)
        if picked is not None and scores[picked[0]] >= MIN_OVERLAP:
            expected_lines.append((line, chunks, scores, picked))
    assert [r["line"] for r in rows] == [line for line, *_ in expected_lines]
    assert len(rows) == 4
    half = NUM_CHUNKS // 2
    for row, (line, chunks, scores, picked) in zip(rows, expected_lines):
        assert row["chunks"]["kept"] == sorted(picked)            # document order, K chunks
        assert row["chunks"]["top_half"] == sorted(picked[:half])
        assert row["chunks"]["bottom_half"] == sorted(picked[-half:])
        assert row["context"] == [chunks[i] for i in sorted(picked)]
        assert row["chunks"]["scores"] == [scores[i] for i in sorted(picked)]
        assert row["question"] == qa_rows[line - 1]["question"]
        assert isinstance(row["chosen"], str) and row["chosen"]
        assert len(row["rejected"]) == 2 and all(row["rejected"])


def test_summary_counts_drop_reasons(built, qa_rows, tokenizer):
    qa, out = built
    summary = json.load(open(str(out).replace(".jsonl", ".summary.json")))
    min_overlap = too_few = 0
    for qa_row in qa_rows:
        _, scores, picked = naive_selection(tokenizer, qa_row, NUM_CHUNKS)
        too_few += picked is None
        min_overlap += picked is not None and scores[picked[0]] < MIN_OVERLAP
    assert (min_overlap, too_few) == (1, 1)
    assert summary["dropped"] == {"min_overlap": min_overlap, "too_few_chunks": too_few}
    assert summary["kept"] == len(read(out)) == len(qa_rows) - min_overlap - too_few
    assert summary["feature_extractor"] in ("lexical", "spacy:en_core_web_lg")
    try:
        import spacy  # noqa: F401
    except ImportError:
        assert summary["feature_extractor"] == "lexical"
    dropped = read(str(out).replace(".jsonl", ".dropped.jsonl"))
    assert dropped == [{"line": 3, "reason": "min_overlap"},
                       {"line": 4, "reason": "too_few_chunks"}]


def test_output_preprocesses(built, smollm2_dir, tmp_path):
    _, out = built
    stats = preprocess_preference([str(out)], str(tmp_path / "pref"), "HuggingFaceTokenizer",
                                  smollm2_dir, progress=False)
    assert stats.rows == len(read(out)) and not stats.skipped
    assert stats.min_rejected == stats.max_rejected == 2


def test_resume_after_sigkill_is_identical(built, smollm2_dir, tmp_path):
    qa, full = built
    out = tmp_path / "logo.jsonl"
    args = ["--input", qa, "--output", str(out), "--model", smollm2_dir] + FLAGS
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "append_kill_worker.py"),
                           "build_logo_data", "1"] + args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == -9, proc.stderr[-2000:]
    torn = out.read_text()
    assert torn.count("\n") == 1 and not torn.endswith("\n")  # row 1 whole, row 2 torn
    assert cli.main(args) == 0
    assert out.read_bytes() == full.read_bytes()
    dropped = str(out).replace(".jsonl", ".dropped.jsonl")
    assert open(dropped).read() == open(str(full).replace(".jsonl", ".dropped.jsonl")).read()
    summary = json.load(open(str(out).replace(".jsonl", ".summary.json")))
    assert summary["this_run"]["already_done"] == 1
    assert summary["this_run"]["torn_lines_dropped"] == 1
    # A finished output is not generated again.
    assert cli.main(args) == 0
    assert out.read_bytes() == full.read_bytes()


def test_judge_with_the_same_model(qa_rows, smollm2_dir, tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows[:1])
    out = tmp_path / "judged.jsonl"
    assert cli.main(["--input", qa, "--output", str(out), "--model", smollm2_dir,
                     "--judge-model", smollm2_dir] + FLAGS) == 0
    summary = json.load(open(tmp_path / "judged.summary.json"))
    rows = read(out)
    assert summary["kept"] + sum(summary["dropped"].values()) == 1
    assert set(summary["dropped"]) <= {"judge_chosen_incorrect", "judge_rejected_correct"}
    for row in rows:
        assert row["judge"]["chosen"] is True and row["judge"]["rejected"] == [False, False]


def test_judge_verdict_is_the_likelier_word(smollm2_dir):
    lm = logo_generate.CausalLM(smollm2_dir)
    items = [("What colour is the sky?", "blue", "The sky is blue."),
             ("What colour is the sky?", "blue", "It is made of cheese.")]
    scores = lm.option_logprobs([logo_generate.JUDGE_PROMPT.format(
        question=q, reference=r, candidate=c) for q, r, c in items], ("correct", "incorrect"), 3)
    # Recompute one log-probability without padding or batching.
    prompt = lm.prompt_ids(logo_generate.JUDGE_PROMPT.format(
        question=items[0][0], reference=items[0][1], candidate=items[0][2]))
    option = lm.tokenizer("incorrect", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + option])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    direct = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(option))
    assert scores[0][1] == pytest.approx(direct, abs=1e-4)
    assert lm.judge(items, 3) == [s[0] > s[1] for s in scores]


# --------------------------------------------------------------------------- #
# Without the model: a fake that echoes its prompt
# --------------------------------------------------------------------------- #

class EchoLM:
    """Answers with its prompt; judges a candidate correct when it contains the reference."""

    def __init__(self, path, *args):
        self.path = path

    def generate(self, contents, max_new_tokens):
        return list(contents)

    def judge(self, items, batch_size):
        return [reference in candidate for _, reference, candidate in items]


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setattr(logo_generate, "CausalLM", EchoLM)


def test_chosen_is_all_chunks_rejected_are_halves(echo, qa_rows, smollm2_dir, tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    out = tmp_path / "echo.jsonl"
    assert cli.main(["--input", qa, "--output", str(out), "--model", smollm2_dir] + FLAGS) == 0
    for row in read(out):
        chunks, question = row["context"], row["question"]
        kept = row["chunks"]["kept"]
        pick = {i: c for i, c in zip(kept, chunks)}
        prompt = logo_generate.generation_prompt
        assert row["chosen"] == prompt(chunks, question)
        assert row["rejected"] == [prompt([pick[i] for i in row["chunks"]["top_half"]], question),
                                   prompt([pick[i] for i in row["chunks"]["bottom_half"]],
                                          question)]


def test_overlap_rule_and_identical_answers(echo, qa_rows, smollm2_dir, tmp_path, tokenizer):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    out = tmp_path / "all.jsonl"
    threshold = 2
    flags = [f for f in FLAGS if f != "--keep-identical"]
    flags[flags.index("--min-overlap") + 1] = str(threshold)
    assert cli.main(["--input", qa, "--output", str(out), "--model", smollm2_dir,
                     "--overlap-rule", "all-kept"] + flags) == 0
    expected = 0
    for qa_row in qa_rows:
        _, scores, picked = naive_selection(tokenizer, qa_row, NUM_CHUNKS)
        expected += picked is not None and min(scores[i] for i in picked) < threshold
    summary = json.load(open(tmp_path / "all.summary.json"))
    assert summary["dropped"].get("min_overlap", 0) == expected > 1

    options = logo_builder.BuildOptions(model=smollm2_dir, chunk_tokens=8, num_chunks=2,
                                        min_overlap=1)
    builder = logo_builder.Builder(options, tokenizer, lexical_features)
    cand = builder.prepare(logo_builder.QARow(7, "x:7", "alpha beta gamma. " * 20, "alpha?",
                                              "gold"))
    assert isinstance(cand, logo_builder.Candidate)
    assert builder.finish(cand, "same", ["same", "other"], None) == logo_builder.IDENTICAL
    assert builder.finish(cand, "", ["x", "y"], None) == logo_builder.EMPTY_ANSWER
    no, yes = False, True
    assert builder.finish(cand, "a", ["b", "c"], {"chosen": no, "rejected": [no, no]}) \
        == logo_builder.JUDGE_CHOSEN_INCORRECT
    assert builder.finish(cand, "a", ["b", "c"], {"chosen": yes, "rejected": [no, yes]}) \
        == logo_builder.JUDGE_REJECTED_CORRECT
    kept = builder.finish(cand, "a", ["b", "c"], {"chosen": yes, "rejected": [no, no]})
    assert kept["line"] == 7 and kept["chosen"] == "a" and kept["rejected"] == ["b", "c"]


BIG = ["--chunk-tokens", "160"]  # chunks that hold whole gold sentences


def test_echo_judge_drop_reasons(echo, qa_rows, smollm2_dir, tmp_path):
    """The echo judge calls an answer correct when its prompt held the gold sentence: a row
    survives only if the gold sentence is in no half (e.g. split over two chunks) but in all K."""
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows)
    out = tmp_path / "judged.jsonl"
    assert cli.main(["--input", qa, "--output", str(out), "--model", smollm2_dir,
                     "--judge-model", smollm2_dir, "--score-with-answer"] + FLAGS + BIG) == 0
    # The same rows without a judge: their answers are the prompts the judge saw.
    plain = tmp_path / "plain.jsonl"
    assert cli.main(["--input", qa, "--output", str(plain), "--model", smollm2_dir,
                     "--score-with-answer"] + FLAGS + BIG) == 0
    expected = {r["line"]: r["reason"] for r in read(tmp_path / "plain.dropped.jsonl")}
    for row in read(plain):
        gold = row["answer"]
        expected[row["line"]] = ("judge_chosen_incorrect" if gold not in row["chosen"] else
                                 "judge_rejected_correct" if any(gold in r for r in row["rejected"])
                                 else None)
    reasons = {r["line"]: r["reason"] for r in read(tmp_path / "judged.dropped.jsonl")}
    assert reasons == {line: why for line, why in expected.items() if why}
    assert "judge_rejected_correct" in reasons.values()
    kept = [line for line, why in expected.items() if why is None]
    assert [r["line"] for r in read(out)] == kept
    summary = json.load(open(tmp_path / "judged.summary.json"))
    assert summary["kept"] == len(kept)
    assert sum(summary["dropped"].values()) == len(qa_rows) - len(kept)
    assert summary["scored_with"] == "question + gold answer"


@pytest.mark.parametrize("line, text, field", [
    (3, "{not json", "not valid JSON"),
    (2, json.dumps({"context": "x", "answer": "y"}), "'question' is missing"),
    (2, json.dumps({"context": "   ", "question": "q", "answer": "y"}), "'context' is empty"),
    (3, json.dumps({"context": ["a"], "question": "q", "answer": "y"}), "'context' must be a "),
    (2, "[1, 2]", "expected a JSON object"),
])
def test_bad_input_names_file_and_line(qa_rows, smollm2_dir, tmp_path, capsys, line, text,
                                       field):
    rows = [qa_rows[0], qa_rows[1], qa_rows[4]]
    rows[line - 1] = text
    qa = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert cli.main(["--input", qa, "--output", str(tmp_path / "o.jsonl"), "--model",
                     smollm2_dir] + FLAGS) == 2
    err = capsys.readouterr().err
    assert f"error: {qa}:{line}: " in err and field in err
    assert not os.path.exists(tmp_path / "o.jsonl")  # nothing written, no model loaded


def test_bad_rows_skipped_and_counted(echo, qa_rows, smollm2_dir, tmp_path):
    rows = [qa_rows[0], "{oops", json.dumps({"context": "x"}), "", qa_rows[1], "7"]
    qa = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert cli.main(["--input", qa, "--output", str(out), "--model", smollm2_dir,
                     "--skip-bad-rows"] + FLAGS) == 0
    summary = json.load(open(tmp_path / "o.summary.json"))
    assert summary["skipped_bad_rows"] == {"missing_field": 1, "not_json": 1, "not_object": 1}
    assert [r["line"] for r in read(out)] == [1, 5] and summary["rows"] == 5


def test_missing_answer_only_when_needed(echo, qa_rows, smollm2_dir, tmp_path, capsys):
    rows = [{k: v for k, v in qa_rows[0].items() if k != "answer"}]
    qa = write_jsonl(tmp_path / "qa.jsonl", rows)
    base = ["--input", qa, "--model", smollm2_dir] + FLAGS
    assert cli.main(base + ["--output", str(tmp_path / "a.jsonl")]) == 0
    assert "answer" not in read(tmp_path / "a.jsonl")[0]
    assert cli.main(base + ["--output", str(tmp_path / "b.jsonl"), "--score-with-answer"]) == 2
    assert f"{qa}:1: field 'answer' is missing" in capsys.readouterr().err


def test_resume_refuses_other_settings(echo, qa_rows, smollm2_dir, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows[:2])
    args = ["--input", qa, "--output", str(tmp_path / "o.jsonl"), "--model", smollm2_dir]
    assert cli.main(args + FLAGS) == 0
    flags = list(FLAGS)
    flags[flags.index("--num-chunks") + 1] = "2"
    assert cli.main(args + flags) == 2
    assert "num_chunks" in capsys.readouterr().err


def test_flag_and_format_errors(qa_rows, smollm2_dir, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows[:1])
    base = ["--input", qa, "--output", str(tmp_path / "o.jsonl"), "--model", smollm2_dir]
    assert cli.main(base + ["--num-chunks", "1"]) == 2
    assert "--num-chunks must be at least 2" in capsys.readouterr().err
    assert cli.main(["--input", qa, "--output", str(tmp_path / "o.jsonl"),
                     "--model", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    try:
        import spacy  # noqa: F401
    except ImportError:
        assert cli.main(base + ["--features", "spacy"]) == 2
        assert "spaCy is not installed" in capsys.readouterr().err
    try:
        import datasets  # noqa: F401
    except ImportError:
        parquet = tmp_path / "qa.parquet"
        parquet.write_bytes(b"PAR1")
        assert cli.main(["--input", str(parquet), "--output", str(tmp_path / "p.jsonl"),
                         "--model", smollm2_dir]) == 2
        assert "needs the 'datasets' package" in capsys.readouterr().err
