"""tools/preprocess_preference.py on real Austen text with real tokenizers (SmolLM2's chat template
and Mistral's bare SentencePiece model), and the offline demo preference set."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from launch import REPO_ROOT
from dev import assets
from megatron_ext.data import preference_rows as pr
from megatron_ext.data import token_flags
from dev.demo_preference import QUESTION, austen_passages, make_preference_rows
from megatron_ext.data.preprocess_preference import (BadPreferenceRow, data_prefix_for,
                                                     preprocess_preference, read_preference_rows)
from megatron_ext.data.tokenizer import build_tokenizer

HF = "HuggingFaceTokenizer"
SP = "SentencePieceTokenizer"


@pytest.fixture(scope="module")
def hf_dir():
    return str(assets.require(assets.smollm2_hf_dir))


@pytest.fixture(scope="module")
def sp_model():
    return str(assets.require(assets.mistral_sentencepiece_model))


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return build_tokenizer(HF, hf_dir)


@pytest.fixture(scope="module")
def passages():
    """Real Austen passages (novel, sentences, text) of about 800 characters."""
    return assets.require(austen_passages, 800)


def sentences(passages, count, start=0):
    """``count`` real sentences of moderate length, in novel order."""
    found = [s for p in passages[start:] for s in p[1] if 30 <= len(s) <= 200]
    return found[:count]


def write_jsonl(path, rows):
    """Rows are dicts (written as JSON) or raw strings (written as they are, for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def template_ids(tok, messages, **kwargs):
    ids = tok._tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def read_flags(prefix):
    """Per document: the flags of its sequences (prompt, chosen, rejected...)."""
    flags = IndexedDataset(token_flags.flags_prefix(prefix))
    bounds = flags.document_indices
    return [[np.array(flags[int(i)]) for i in range(a, b)] for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- #
# Tokenization against the real templates
# --------------------------------------------------------------------------- #

def test_prompt_rows_equal_smollm2_template_for_pairs_and_three_rejected(tmp_path, hf_dir, hf_tok,
                                                                        passages):
    text = sentences(passages, 20)
    rows = [  # TRL pair (rejected a string), M = 3 list, and one with a system message
        {"prompt": text[0], "chosen": text[1], "rejected": text[2]},
        {"prompt": text[3], "chosen": text[4], "rejected": text[5:8]},
        {"system": text[8], "prompt": text[9], "chosen": text[10], "rejected": [text[11]],
         "extra": "ignored"},
    ]
    stats = preprocess_preference([write_jsonl(tmp_path / "p.jsonl", rows)], str(tmp_path / "p"),
                                  HF, hf_dir, progress=False)
    prefix = data_prefix_for(str(tmp_path / "p"))
    assert (stats.rows, stats.min_rejected, stats.max_rejected) == (3, 1, 3)
    assert stats.chat_template is True
    written = read_preference_rows(prefix)
    assert [len(r["rejected"]) for r in written] == [1, 3, 1]
    for row, got in zip(rows, written):
        prompt = ([{"role": "system", "content": row["system"]}] if "system" in row else []) \
            + [{"role": "user", "content": row["prompt"]}]
        rejected = row["rejected"] if isinstance(row["rejected"], list) else [row["rejected"]]
        assert got["prompt"].tolist() == template_ids(hf_tok, prompt, add_generation_prompt=True)
        for answer, ids in zip([row["chosen"]] + rejected, [got["chosen"]] + got["rejected"]):
            full = template_ids(hf_tok, prompt + [{"role": "assistant", "content": answer}])
            assert got["prompt"].tolist() + ids.tolist() == full
            # The answer is the content plus the end-of-turn marker, as the template writes it.
            assert hf_tok.detokenize(ids) == answer + "<|im_end|>\n"
        # Two prompt segments: template header, then user content + generation prompt.
        assert len(got["segments"]) == 2
        assert hf_tok.detokenize(got["segments"][0]).endswith("<|im_start|>user\n")
        assert got["segments"][0][0] == hf_tok.bos  # SmolLM2's template starts with its BOS

    meta = token_flags.read_meta(prefix)
    assert {k: meta[k] for k in ("kind", "tokenizer_type", "tokenizer_model", "chat_template",
                                 "rows", "min_rejected", "max_rejected", "context_chunk_tokens",
                                 "max_answer_tokens", "skipped")} == {
        "kind": "preference", "tokenizer_type": HF, "tokenizer_model": hf_dir,
        "chat_template": True, "rows": 3, "min_rejected": 1, "max_rejected": 3,
        "context_chunk_tokens": 1024, "max_answer_tokens": 2048, "skipped": {}}
    assert meta["tokens"] == stats.tokens == sum(
        len(r["prompt"]) + len(r["chosen"]) + sum(len(x) for x in r["rejected"]) for r in written)


def test_flags_mark_prompt_segment_ends_answer_targets_and_document_end(tmp_path, hf_dir,
                                                                       passages):
    rows = make_preference_rows(num_rows=3, num_chunks=3, chunk_chars=600, num_rejected=2, seed=5)
    rows.append({"prompt": sentences(passages, 1)[0], "chosen": "Yes.", "rejected": ["No."]})
    preprocess_preference([write_jsonl(tmp_path / "f.jsonl", rows)], str(tmp_path / "f"), HF,
                          hf_dir, progress=False)
    prefix = data_prefix_for(str(tmp_path / "f"))
    for got, flags in zip(read_preference_rows(prefix), read_flags(prefix)):
        assert [len(f) for f in flags] == [len(got["prompt"]), len(got["chosen"])] + [
            len(r) for r in got["rejected"]]
        prompt, answers = flags[0], flags[1:]
        assert not (prompt & token_flags.TARGET).any()
        ends = np.cumsum([len(s) for s in got["segments"]]) - 1
        assert np.flatnonzero(prompt & token_flags.SEGMENT_END).tolist() == ends.tolist()
        assert prompt[-1] == token_flags.SEGMENT_END
        everything = np.concatenate(answers)
        assert (everything & token_flags.TARGET).all()
        # Only the document's very last token (end of the last rejected answer) closes it.
        marks = everything & (token_flags.DOCUMENT_END | token_flags.SEGMENT_END)
        assert np.flatnonzero(marks).tolist() == [len(everything) - 1]
        last = token_flags.TARGET | token_flags.DOCUMENT_END | token_flags.SEGMENT_END
        assert everything[-1] == last


def test_string_context_is_cut_into_chunks_of_context_chunk_tokens(tmp_path, hf_dir, hf_tok,
                                                                  passages):
    context = "\n".join(p[2] for p in passages[10:14])  # ~3200 characters of one novel
    question = "Who is speaking in the second paragraph?"
    rows = [{"context": context, "question": question, "chosen": sentences(passages, 1)[0],
             "rejected": sentences(passages, 3, start=20)}]
    preprocess_preference([write_jsonl(tmp_path / "c.jsonl", rows)], str(tmp_path / "c"), HF,
                          hf_dir, context_chunk_tokens=100, progress=False)
    got = read_preference_rows(data_prefix_for(str(tmp_path / "c")))[0]
    head, *chunks, last = got["segments"]
    context_ids = hf_tok.tokenize(context)
    assert len(chunks) == -(-len(context_ids) // 100) >= 5
    assert all(len(c) == 100 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 100
    assert np.concatenate(chunks).tolist() == context_ids
    assert hf_tok.detokenize(head).endswith("<|im_start|>user\n")
    assert hf_tok.detokenize(last) == "\n\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
    # Byte-level BPE decodes losslessly: the pieces spell the template's prompt exactly.
    messages = [{"role": "user", "content": context + "\n\n" + question}]
    assert hf_tok.detokenize(got["prompt"]) == hf_tok._tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_list_context_keeps_one_segment_per_chunk(tmp_path, hf_dir, hf_tok):
    rows = make_preference_rows(num_rows=2, num_chunks=5, chunk_chars=600, num_rejected=2, seed=1)
    preprocess_preference([write_jsonl(tmp_path / "l.jsonl", rows)], str(tmp_path / "l"), HF,
                          hf_dir, context_chunk_tokens=16, progress=False)  # not used for lists
    for row, got in zip(rows, read_preference_rows(data_prefix_for(str(tmp_path / "l")))):
        head, *chunks, last = got["segments"]
        assert [c.tolist() for c in chunks] == [hf_tok.tokenize(c + "\n\n") for c in row["context"]]
        assert hf_tok.detokenize(last) == row["question"] + "<|im_end|>\n<|im_start|>assistant\n"
        messages = [{"role": "user", "content": "\n\n".join(row["context"]) + "\n\n"
                     + row["question"]}]
        assert hf_tok.detokenize(got["prompt"]) == hf_tok._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_trl_conversational_rows(tmp_path, hf_dir, hf_tok, passages):
    text = sentences(passages, 12, start=40)
    messages = [{"role": "system", "content": text[0]}, {"role": "user", "content": text[1]},
                {"role": "assistant", "content": text[2]}, {"role": "user", "content": text[3]}]
    turn = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    rows = [{"prompt": messages, "chosen": turn(text[4]), "rejected": turn(text[5])},
            {"prompt": messages[1:], "chosen": turn(text[6]),
             "rejected": [turn(text[7]), text[8], turn(text[9])]}]
    preprocess_preference([write_jsonl(tmp_path / "t.jsonl", rows)], str(tmp_path / "t"), HF,
                          hf_dir, progress=False)
    written = read_preference_rows(data_prefix_for(str(tmp_path / "t")))
    assert [len(r["rejected"]) for r in written] == [1, 3]
    for row, got, answers in zip(rows, written, [[text[4], text[5]], text[6:10]]):
        assert len(got["segments"]) == 1  # rendered with the generation prompt as one piece
        for answer, ids in zip(answers, [got["chosen"]] + got["rejected"]):
            full = template_ids(hf_tok, row["prompt"] + turn(answer))
            assert got["prompt"].tolist() + ids.tolist() == full


def test_sentencepiece_has_no_template_so_answers_end_with_eod(tmp_path, sp_model, passages,
                                                              capsys):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    text = sentences(passages, 6)
    rows = [{"prompt": text[0], "chosen": text[1], "rejected": text[2:4]},
            {"context": [text[4]], "question": text[5], "chosen": text[1], "rejected": text[0]}]
    stats = preprocess_preference([write_jsonl(tmp_path / "s.jsonl", rows)], str(tmp_path / "s"),
                                  SP, sp_model, chat_template=True, progress=False)
    assert "no chat template" in capsys.readouterr().err
    prefix = data_prefix_for(str(tmp_path / "s"))
    assert stats.chat_template is False and token_flags.read_meta(prefix)["chat_template"] is False
    prompt_row, context_row = read_preference_rows(prefix)
    for got in (prompt_row, context_row):
        assert got["prompt"][0] == sp.bos_id() and got["chosen"][-1] == sp.eos_id()
        assert got["chosen"][:-1].tolist() == sp.encode(text[1])
    assert [r.tolist() for r in prompt_row["rejected"]] == [sp.encode(t) + [sp.eos_id()]
                                                           for t in text[2:4]]
    # Plain render "User: {content}\n\nAssistant: ", cut at the user content.
    assert [s.tolist() for s in prompt_row["segments"]] == [
        [sp.bos_id()] + sp.encode("User: "), sp.encode(text[0] + "\n\nAssistant: ")]
    assert [s.tolist() for s in context_row["segments"]] == [
        [sp.bos_id()] + sp.encode("User: "), sp.encode(text[4] + "\n\n"),
        sp.encode(text[5] + "\n\nAssistant: ")]


def _tokenizer_copy(hf_dir, dest, template):
    """SmolLM2's real tokenizer with another chat template (None: no template at all)."""
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_bytes((Path(hf_dir) / name).read_bytes())
    if template is not None:
        (dest / "chat_template.jinja").write_text(template)
    return str(dest)


def test_template_that_trims_the_user_message_is_reported(tmp_path, hf_dir, passages):
    # Llama-3's template trims message content, so "text\n" would not be what the model sees.
    template = (Path(hf_dir) / "chat_template.jinja").read_text()
    assert "message['content']" in template
    trimming = _tokenizer_copy(hf_dir, tmp_path / "trim",
                               template.replace("message['content']", "message['content'] | trim"))
    text = sentences(passages, 3)
    rows = [{"prompt": text[0], "chosen": text[1], "rejected": text[2]},
            {"prompt": text[0] + "\n", "chosen": text[1], "rejected": text[2]}]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(BadPreferenceRow, match=f"{re.escape(src)}:2: field 'prompt': the chat "
                                               "template rewrites the user message"):
        preprocess_preference([src], str(tmp_path / "t"), HF, trimming, progress=False)
    stats = preprocess_preference([src], str(tmp_path / "t"), HF, trimming, skip_bad_rows=True,
                                  progress=False)
    assert (stats.rows, stats.skipped) == (1, {pr.TEMPLATE: 1})


def test_hf_tokenizer_without_template_falls_back_to_plain_render(tmp_path, hf_dir, hf_tok,
                                                                  passages, capsys):
    bare = _tokenizer_copy(hf_dir, tmp_path / "bare", None)
    text = sentences(passages, 3)
    src = write_jsonl(tmp_path / "b.jsonl", [{"prompt": text[0], "chosen": text[1],
                                              "rejected": text[2]}])
    stats = preprocess_preference([src], str(tmp_path / "b"), HF, bare, progress=False)
    assert "no chat template" in capsys.readouterr().err
    assert token_flags.read_meta(stats.data_prefix)["chat_template"] is False
    got = read_preference_rows(stats.data_prefix)[0]
    assert hf_tok.detokenize(got["prompt"]) == "<|im_start|>User: " + text[0] + "\n\nAssistant: "
    assert got["chosen"].tolist() == hf_tok.tokenize(text[1]) + [hf_tok.eod]


def test_worker_count_does_not_change_the_bytes(tmp_path, hf_dir, passages):
    rows = make_preference_rows(num_rows=24, num_chunks=4, chunk_chars=800, num_rejected=3, seed=2)
    # A few rows much longer than the rest, so workers finish out of order.
    for i in (0, 9, 17):
        rows[i] = {**rows[i], "context": "\n".join(p[2] for p in passages[i:i + 150])}
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    for workers in (1, 2):
        stats = preprocess_preference([src], str(tmp_path / f"w{workers}"), HF, hf_dir,
                                      workers=workers, context_chunk_tokens=64, progress=False)
        assert (stats.rows, stats.skipped) == (24, {})
    for suffix in (".bin", ".idx", "_tokenflags.bin", "_tokenflags.idx"):
        one = (tmp_path / f"w1_preference_document{suffix}").read_bytes()
        two = (tmp_path / f"w2_preference_document{suffix}").read_bytes()
        assert one == two and len(one) > 0


# --------------------------------------------------------------------------- #
# Bad rows
# --------------------------------------------------------------------------- #

GOOD = {"prompt": "Where does Emma live?", "chosen": "At Hartfield.", "rejected": ["At Randalls."]}
LONG = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ") * 4

BAD_ROWS = [  # (line, field named in the message or None, reason, extra options)
    ("this is not json", None, pr.NOT_JSON, {}),
    ('["a", "list"]', None, pr.NOT_OBJECT, {}),
    ({"prompt": "Who?", "rejected": ["x"]}, "chosen", pr.MISSING_FIELD, {}),
    ({"prompt": "Who?", "chosen": "Emma."}, "rejected", pr.MISSING_FIELD, {}),
    ({"chosen": "Emma.", "rejected": ["x"]}, "prompt", pr.MISSING_FIELD, {}),
    ({"prompt": "Who?", "context": "Text.", "question": "Who?", "chosen": "E", "rejected": "x"},
     "prompt", pr.MISSING_FIELD, {}),
    ({"context": "Emma was handsome.", "chosen": "Emma.", "rejected": ["x"]}, "question",
     pr.MISSING_FIELD, {}),
    ({"prompt": "Who?", "chosen": "  \n", "rejected": ["x"]}, "chosen", pr.EMPTY_TEXT, {}),
    ({"prompt": "Who?", "chosen": "Emma.", "rejected": ["Harriet.", " "]}, "rejected[1]",
     pr.EMPTY_TEXT, {}),
    ({"prompt": "   ", "chosen": "Emma.", "rejected": "x"}, "prompt", pr.EMPTY_TEXT, {}),
    ({"prompt": "Who?", "chosen": "Emma.", "rejected": []}, "rejected", pr.EMPTY_REJECTED, {}),
    ({"prompt": "Who?", "chosen": 42, "rejected": ["x"]}, "chosen", pr.WRONG_TYPE, {}),
    ({"prompt": "Who?", "chosen": "Emma.", "rejected": {"text": "x"}}, "rejected",
     pr.WRONG_TYPE, {}),
    ({"context": ["Emma.", 7], "question": "Who?", "chosen": "E", "rejected": "x"}, "context[1]",
     pr.WRONG_TYPE, {}),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
      "chosen": "E", "rejected": "x"}, "prompt", pr.WRONG_TYPE, {}),
    ({"prompt": "Who?", "chosen": [{"role": "user", "content": "E"}], "rejected": "x"}, "chosen",
     pr.WRONG_TYPE, {}),
    ({"prompt": "Who?", "chosen": LONG, "rejected": ["x"]}, "chosen", pr.ANSWER_TOO_LONG,
     {"max_answer_tokens": 64}),
    ({"prompt": "Who?", "chosen": "Emma.", "rejected": ["x", LONG]}, "rejected[1]",
     pr.ANSWER_TOO_LONG, {"max_answer_tokens": 64}),
    ({"context": [LONG, LONG], "question": "Who?", "chosen": "E", "rejected": "x"}, "context",
     pr.PROMPT_TOO_LONG, {"max_prompt_tokens": 100}),
]


@pytest.mark.parametrize("line,field,reason,options", BAD_ROWS,
                         ids=[f"{r[2]}-{r[1]}" for r in BAD_ROWS])
def test_bad_row_names_file_line_and_field(tmp_path, sp_model, line, field, reason, options):
    src = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(BadPreferenceRow) as err:
        preprocess_preference([src], str(tmp_path / "out"), SP, sp_model, progress=False,
                              **options)
    assert err.value.reason == reason
    assert str(err.value).startswith(f"{src}:2: ")
    if field is not None:
        assert f"field '{field}'" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing published, no temporary files


def test_skip_bad_rows_counts_each_reason_and_keeps_the_good_rows(tmp_path, hf_dir, hf_tok):
    lines = [GOOD, "not json", {**GOOD, "chosen": "Knightley."}, {**GOOD, "rejected": []},
             {"prompt": "Who?", "chosen": ""}, {**GOOD, "chosen": " "}, {**GOOD, "chosen": LONG},
             {**GOOD, "rejected": ["Donwell.", "Highbury.", "London."]}]
    stats = preprocess_preference([write_jsonl(tmp_path / "m.jsonl", lines)], str(tmp_path / "m"),
                                  HF, hf_dir, skip_bad_rows=True, max_answer_tokens=64,
                                  progress=False)
    expected = {pr.NOT_JSON: 1, pr.EMPTY_REJECTED: 1, pr.MISSING_FIELD: 1, pr.EMPTY_TEXT: 1,
                pr.ANSWER_TOO_LONG: 1}
    prefix = data_prefix_for(str(tmp_path / "m"))
    assert stats.skipped == expected == token_flags.read_meta(prefix)["skipped"]
    assert (stats.rows, stats.min_rejected, stats.max_rejected) == (3, 1, 3)
    assert "skipped 5 rows" in stats.summary()
    written = read_preference_rows(prefix)
    assert [hf_tok.detokenize(r["chosen"]) for r in written] == [
        "At Hartfield.<|im_end|>\n", "Knightley.<|im_end|>\n", "At Hartfield.<|im_end|>\n"]


def test_cli_exit_code_2_on_a_bad_row_and_summary_on_success(tmp_path, sp_model):
    def run(*args):
        return subprocess.run([sys.executable, "tools/preprocess_preference.py",
                               "--tokenizer-type", SP, "--tokenizer-model", sp_model, *args],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    out = tmp_path / "out"
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, {**GOOD, "chosen": None}])
    proc = run("--input", bad, "--output-prefix", str(out / "x"))
    assert proc.returncode == 2
    assert f"{bad}:3: field 'chosen' must be a string" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or os.listdir(out) == []

    proc = run("--input", bad, "--output-prefix", str(out / "x"), "--skip-bad-rows",
               "--workers", "2", "--no-chat-template")
    assert proc.returncode == 0, proc.stderr
    assert "2 preference rows" in proc.stdout and "1 wrong_type" in proc.stdout
    assert f"--data-path {out / 'x'}_preference_document" in proc.stdout


# --------------------------------------------------------------------------- #
# The demo generator
# --------------------------------------------------------------------------- #

def _normalised_novels():
    with open(assets.corpus_jsonl("austen"), encoding="utf-8") as f:
        return {novel["id"]: " ".join(novel["text"].split()) for novel in map(json.loads, f)}


def test_demo_rows_are_real_retrieval_questions_and_deterministic(tmp_path, hf_dir):
    args = dict(num_rows=16, num_chunks=6, chunk_chars=1000, num_rejected=3, seed=11)
    rows = assets.require(make_preference_rows, **args)
    assert rows == make_preference_rows(**args)
    assert rows != make_preference_rows(**{**args, "seed": 12})
    novels = _normalised_novels()
    pattern = re.escape(QUESTION).replace(re.escape("{quoted}"), "(.*)")
    for row in rows:
        quoted = re.fullmatch(pattern, row["question"]).group(1)
        context = "\n\n".join(row["context"])
        assert len(row["context"]) == 6 and context.count(quoted) == 1
        # The chosen sentence really comes right after the quoted one in the novel.
        assert f"{quoted} {row['chosen']}" in novels[row["source"]]
        assert len(row["rejected"]) == 3 and row["chosen"] not in row["rejected"]
        assert len(set(row["rejected"])) == 3
        for sentence in [row["chosen"]] + row["rejected"]:
            assert 20 <= len(sentence) <= 300 and sentence in context  # wrong retrievals too
    assert len({r["source"] for r in rows}) > 1  # passages come from several novels

    # The command-line tool writes the same rows, and they preprocess cleanly with SmolLM2.
    out = tmp_path / "demo.jsonl"
    proc = subprocess.run([sys.executable, "tools/make_preference_demo.py", "--output", str(out),
                           "--num-rows", "16", "--num-chunks", "6", "--chunk-chars", "1000",
                           "--num-rejected", "3", "--seed", "11"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    stats = preprocess_preference([str(out)], str(tmp_path / "demo"), HF, hf_dir, progress=False)
    assert (stats.rows, stats.skipped, stats.min_rejected, stats.max_rejected) == (16, {}, 3, 3)
    written = read_preference_rows(stats.data_prefix)
    assert all(len(r["segments"]) == 6 + 2 for r in written)
