"""LongRecipe impactful-token analysis and sentence selection (tools/longrecipe_select.py).

- token classes on real text with SmolLM2's tokenizer;
- ``analyze`` on two real models: SmolLM2 and the same weights with a larger RoPE base (the static
  NTK base for 8k -> 32k), over Austen: a ranked class table with consistent fields, and a PNG;
- the logit change is extended minus base, of the token that actually follows (a tiny model whose
  "extended" copy has exactly doubled logits makes delta equal the base logit);
- ``select`` on Austen: every sample within the budget and close to it, whole source sentences in
  source order (checked against the delimiter rules, not the splitter), impactful sentences
  preferred, windows drawn from the whole document, deterministic from the seed.
"""

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
from launch import run  # noqa: E402

from megatron_ext.selection.longrecipe import impactful_tokens as it  # noqa: E402
from megatron_ext.selection.longrecipe import sentence_selection as ss  # noqa: E402
from megatron_ext.selection.longrecipe import token_classes as tc  # noqa: E402

TARGET, RATIO = 2048, 0.3
BUDGET = round(RATIO * TARGET)
# Sentence ends as the tool documents them, re-stated here: . ! ? then closing quotes/brackets.
SENTENCE_END = re.compile(r"[.!?][\"')\]}”’»]*$")
NUMERAL = re.compile(r"\d|\b(?:" + "|".join(sorted(tc.NUMBER_WORDS)) + r")\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def smollm2():
    from dev import assets

    return assets.require(assets.smollm2_hf_dir)


@pytest.fixture(scope="module")
def austen_rows():
    from dev import assets

    with open(assets.require(assets.corpus_jsonl, "austen")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


def test_tokens_are_classified_by_their_word(hf_tokenizer):
    text = 'Emma Woodhouse, handsome and rich, in 1815 twenty-one\n\n"Don\'t!" she said.'
    enc = hf_tokenizer(text, return_offsets_mapping=True)
    labels = {}
    for (start, end), label in zip(enc["offset_mapping"], tc.token_classes(text,
                                                                           enc["offset_mapping"])):
        labels.setdefault(text[start:end], set()).add(label)
    pieces = [hf_tokenizer.decode([i]) for i in enc["input_ids"]]
    assert len(pieces) > len(text.split())  # sub-word pieces exist, e.g. in "Woodhouse"
    for word, expected in [("Woodhouse", tc.CAPITALISED), ("1815", tc.NUMERALS),
                           ("twenty", tc.NUMERALS), ("handsome", tc.OTHER),
                           ("and", tc.FUNCTION_WORDS), ("she", tc.FUNCTION_WORDS)]:
        start = re.search(rf"\b{word}\b", text).start()
        covering = [label for (s, e), label in zip(enc["offset_mapping"],
                                                   tc.token_classes(text, enc["offset_mapping"]))
                    if s < start + len(word) and e > start and text[s:e].strip()]
        assert covering and set(covering) == {expected}, (word, covering)
    assert labels[","] == {tc.PUNCTUATION}
    assert any(k.strip() == "" and v == {tc.WHITESPACE} for k, v in labels.items())


# ------------------------------------------------------------------------------------------
# analyze
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extended_smollm2(smollm2, tmp_path_factory):
    """SmolLM2's weights with the static NTK RoPE base for 8k -> 32k in a copied config.json."""
    from megatron_ext.model.rope_base import ntk_rope_base

    folder = tmp_path_factory.mktemp("extended_smollm2")
    for name in os.listdir(smollm2):
        if name != "config.json":
            os.symlink(smollm2 / name, folder / name)
    config = json.loads((smollm2 / "config.json").read_text())
    rope = config["rope_parameters"]
    rope["rope_theta"] = ntk_rope_base(rope["rope_theta"], config["max_position_embeddings"],
                                       32768, config["head_dim"])
    config["max_position_embeddings"] = 32768
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def analysis(smollm2, extended_smollm2, austen_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:20000]}) + "\n"
                            for r in austen_rows[:2]))
    proc = run([sys.executable, "tools/longrecipe_select.py", "analyze", "--base-model", smollm2,
                "--extended-model", extended_smollm2, "--input", docs, "--max-tokens", "512",
                "--num-docs", "2", "--output", root / "report.json", "--no-progress"])
    return json.loads((root / "report.json").read_text()), proc, root


def test_analyze_ranks_token_classes(analysis):
    report, proc, root = analysis
    rows = report["classes"]
    assert [d["tokens"] for d in report["documents"]] == [512, 512]
    assert report["scored_tokens"] == 2 * 511 == sum(r["tokens"] for r in rows)
    assert report["position_bucket_width"] == math.ceil(it.MIN_TOKENS_PER_BUCKET / 2)
    # About 20 % of the tokens of every bucket: rounding per bucket moves it by < 1 per bucket.
    buckets = math.ceil(512 / report["position_bucket_width"])
    assert abs(report["top_tokens"] - 0.2 * report["scored_tokens"]) <= buckets
    assert sum(r["top_tokens"] for r in rows) == report["top_tokens"]
    assert sum(r["base_rate"] for r in rows) == pytest.approx(1.0)
    assert sum(r["top_share"] for r in rows) == pytest.approx(1.0)
    for r in rows:
        assert r["base_rate"] == pytest.approx(r["tokens"] / report["scored_tokens"])
        assert r["lift"] == pytest.approx(r["top_share"] / r["base_rate"])
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["lift"] for r in rows] == sorted((r["lift"] for r in rows), reverse=True)
    assert {tc.NUMERALS, tc.PUNCTUATION, tc.FUNCTION_WORDS, tc.CAPITALISED} <= \
        {r["class"] for r in rows}  # Emma's opening has all of them ("twenty-one years")
    # The two models really differ, and the top tokens are the most increased ones.
    assert report["delta"]["mean_abs"] > 0.01 and report["notes"] == []
    assert all(r["mean_delta_top"] > report["delta"]["mean"] for r in rows
               if r["mean_delta_top"] is not None)
    # The printed table lists the classes in rank order.
    printed = [line.split()[1] for line in proc.stdout.splitlines()
               if re.match(r"\s+\d+\s+[a-z_]+\s+\d+", line)]
    assert printed == [r["class"] for r in rows]
    if report["pos"]["available"]:
        assert report["pos"]["classes"]
    else:
        assert "spaCy" in report["pos"]["reason"]


def test_analyze_writes_a_chart(analysis):
    from PIL import Image

    report, _, root = analysis
    assert report["chart"] == str(root / "report.png")
    with Image.open(report["chart"]) as image:
        assert image.format == "PNG" and image.size[0] > 400


def test_delta_is_extended_minus_base_of_the_next_token(austen_rows):
    """An 'extended' model whose logits are exactly twice the base's: delta = base logit."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dev import assets

    tokenizer = AutoTokenizer.from_pretrained(str(assets.require(assets.smollm2_hf_dir)))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    extended = LlamaForCausalLM(config).eval()
    extended.load_state_dict(base.state_dict())
    with torch.no_grad():
        extended.lm_head.weight.mul_(2)
    docs = [(r["id"], r["text"][:3000]) for r in austen_rows[:3]]
    scored = it.score_documents(base, extended, tokenizer, docs, max_tokens=64, progress=False)
    for doc, (_, text) in zip(scored, docs):
        ids = tokenizer(text)["input_ids"][:64]
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([ids])).logits[0]
        expected = [logits[t - 1, ids[t]].item() for t in range(1, len(ids))]
        np.testing.assert_allclose(doc.delta, expected, rtol=1e-4, atol=1e-5)
        assert doc.positions.tolist() == list(range(1, 64))
        assert doc.token_ids.tolist() == ids[1:]
    report = it.build_report(scored, tokenizer, 0.2)
    assert report["position_bucket_width"] == math.ceil(it.MIN_TOKENS_PER_BUCKET / 3)


def test_top_tokens_are_chosen_per_position_bucket():
    rng = np.random.default_rng(0)
    positions = np.tile(np.arange(1, 101), 7)
    # Late positions change much more: a global ranking would pick only them.
    delta = rng.normal(size=positions.size) + positions / 10
    top = it.top_by_position(positions, delta, 0.2, width=10)
    for b in range(11):
        in_bucket = positions // 10 == b
        if not in_bucket.any():
            continue
        assert top[in_bucket].sum() == max(1, round(0.2 * in_bucket.sum()))
        assert delta[in_bucket & top].min() >= delta[in_bucket & ~top].max()
    assert top[positions < 50].sum() > 0.4 * top.sum()
    with pytest.raises(it.AnalysisError, match="--top-fraction"):
        it.top_by_position(positions, delta, 1.5, 10)


def test_bad_documents_are_named_by_line(tmp_path, smollm2):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine."}\n{"body": "no text field"}\n')
    with pytest.raises(it.AnalysisError, match="bad.jsonl:2: no string field 'text'"):
        list(it.read_documents(str(bad)))
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import longrecipe_select

    assert longrecipe_select.main(["select", "--input", str(bad), "--output",
                                   str(tmp_path / "o.jsonl"), "--target-seq-length", "64",
                                   "--tokenizer-model", str(smollm2), "--no-progress"]) == 2
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.partial").exists()
    assert longrecipe_select.main(["select", "--input", str(bad), "--output",
                                   str(tmp_path / "o.jsonl"), "--target-seq-length", "64",
                                   "--tokenizer-model", str(smollm2), "--keep-classes",
                                   "numerals,verbs"]) == 2


# ------------------------------------------------------------------------------------------
# select
# ------------------------------------------------------------------------------------------

def is_boundary(text: str, i: int) -> bool:
    """A sentence may start at i (wrapped-lines rules): text start/end, or whitespace at i after a
    sentence end, or a whitespace run at i holding a blank line."""
    if i in (0, len(text)):
        return True
    if not text[i].isspace() or text[i - 1].isspace():
        return False
    run = re.match(r"\s+", text[i:]).group()
    if run.count("\n") >= 2:
        return True
    return bool(SENTENCE_END.search(text[:i])) and not re.search(r"\b(Mr|Mrs|Dr|St)\.$",
                                                                  text[:i])


@pytest.fixture(scope="module")
def selection(smollm2, austen_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    sources = {r["id"]: r["text"][:60000] for r in austen_rows[:2]}
    rows = [{"id": k, "text": v} for k, v in sources.items()]
    rows.append({"id": "short", "text": austen_rows[2]["text"][:1500]})  # < budget
    rows.append({"id": "empty", "text": ""})
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run([sys.executable, "tools/longrecipe_select.py", "select", "--input",
                root / "docs.jsonl", "--output", root / "selected.jsonl", "--keep-classes",
                "numerals", "--budget-ratio", str(RATIO), "--target-seq-length", str(TARGET),
                "--tokenizer-model", smollm2, "--wrapped-lines", "--no-progress"])
    samples = [json.loads(line) for line in (root / "selected.jsonl").read_text().splitlines()]
    return sources, samples, proc, root


def test_select_honours_the_budget(selection, hf_tokenizer):
    sources, samples, proc, _ = selection
    assert samples and {s["source_id"] for s in samples} == set(sources)
    for s in samples:
        tokens = len(hf_tokenizer(s["text"], add_special_tokens=False)["input_ids"])
        assert tokens == s["tokens"] and s["budget"] == BUDGET
        assert 0.9 * BUDGET <= tokens <= BUDGET, s["window"]
    assert re.search(r"4 in, 2 used, 1 too short .*, 1 empty", proc.stdout)
    assert f"samples: {len(samples)} written" in proc.stdout


def test_select_keeps_whole_sentences_in_order_from_the_whole_document(selection, hf_tokenizer):
    sources, samples, _, _ = selection
    for doc_id, source in sources.items():
        mine = [s for s in samples if s["source_id"] == doc_id]
        assert [s["window"] for s in mine] == list(range(len(mine)))
        previous_end = 0
        for s in mine:
            spans = s["source_spans"]
            assert s["text"] == "".join(source[a:b] for a, b in spans)
            assert len(spans) == s["sentences_kept"] < s["sentences_total"]
            for a, b in spans:
                assert previous_end <= a < b, "spans overlap or go backwards"
                assert is_boundary(source, a) and is_boundary(source, b), source[a:b]
                previous_end = b
        # Windows of at most T tokens cover the document: samples are not drawn from its start.
        doc_tokens = len(hf_tokenizer(source, add_special_tokens=False)["input_ids"])
        assert math.ceil(doc_tokens / TARGET) <= len(mine) <= math.ceil(doc_tokens / TARGET) + 2
        assert all(s["window_tokens"] <= TARGET for s in mine)
        assert previous_end > 0.9 * len(source)


def test_select_prefers_impactful_sentences(selection, hf_tokenizer):
    sources, samples, _, _ = selection

    def length(text):
        return len(hf_tokenizer(text, add_special_tokens=False)["input_ids"])

    kept = impactful_kept = partial_windows = 0
    for s in samples:
        source = sources[s["source_id"]]
        flags = [bool(NUMERAL.search(source[a:b])) for a, b in s["source_spans"]]
        assert sum(flags) == s["impactful_kept"]
        kept += len(flags)
        impactful_kept += sum(flags)
        if s["impactful_kept"] < s["impactful_total"]:
            # An impactful sentence is left out only when it no longer fits the budget that the
            # kept impactful sentences leave.
            partial_windows += 1
            start, end = s["window_span"]
            window = [(a, b) for a, b in ss.split_sentences(source, wrapped_lines=True)
                      if start <= a and b <= end]
            kept_spans = {tuple(span) for span in s["source_spans"]}
            dropped = [length(source[a:b]) for a, b in window
                       if NUMERAL.search(source[a:b]) and (a, b) not in kept_spans]
            used = sum(length(source[a:b]) for (a, b), f in zip(s["source_spans"], flags) if f)
            assert len(dropped) == s["impactful_total"] - s["impactful_kept"]
            assert all(d > BUDGET - used for d in dropped), (dropped, BUDGET - used)
    total = sum(s["sentences_total"] for s in samples)
    impactful_total = sum(s["impactful_total"] for s in samples)
    assert impactful_total > 0
    assert impactful_kept / kept > 2 * impactful_total / total


def test_select_is_deterministic_from_the_seed(selection, smollm2):
    _, _, _, root = selection
    reference = (root / "selected.jsonl").read_text()
    tokenize = ss.tokenizer_counter("HuggingFaceTokenizer", str(smollm2))

    def again(seed, name):
        selector = ss.SentenceSelector(tokenize, TARGET, RATIO, [tc.NUMERALS],
                                       wrapped_lines=True, seed=seed)
        ss.select_file(str(root / "docs.jsonl"), str(root / name), selector, progress=False)
        return (root / name).read_text()

    assert again(1234, "same.jsonl") == reference
    assert again(99, "other.jsonl") != reference


def test_split_sentences_covers_text_at_delimiters(austen_rows, tmp_path):
    from dev import assets

    text = austen_rows[0]["text"][:30000]
    for wrapped in (False, True):
        spans = ss.split_sentences(text, wrapped_lines=wrapped)
        assert "".join(text[a:b] for a, b in spans) == text
        for a, _ in spans[1:]:
            run_ = re.match(r"\s+", text[a:]).group()
            after_end = SENTENCE_END.search(text[:a]) is not None
            assert after_end or run_.count("\n") >= (2 if wrapped else 1), text[a - 30:a + 10]
        if wrapped:  # (unwrapped, a line break after "Mr." ends a sentence like any other)
            assert not any(text[a:b].rstrip().endswith(" Mr.") for a, b in spans)
    code = json.loads(open(assets.require(assets.corpus_jsonl, "pystdlib")).readline())["text"]
    lines = ss.split_sentences(code[:20000], ss.LINES)
    assert "".join(code[a:b] for a, b in lines) == code[:20000]
    assert all("\n" in code[a:b][:len(code[a:b]) - len(code[a:b].lstrip())] for a, b in lines[1:])


def test_windows_cover_in_order_within_target():
    rng = np.random.default_rng(0)
    for _ in range(500):
        lengths = rng.integers(1, 80, int(rng.integers(50, 1500))).tolist()
        target = int(rng.integers(1000, 8000))
        found = ss.windows(lengths, target)
        assert [i for w in found for i in w] == list(range(len(lengths)))
        sizes = [sum(lengths[i] for i in w) for w in found]
        assert max(sizes) <= target
        if sum(lengths) > target:  # no stub windows: each holds at least ~half a target
            assert min(sizes) >= target / 2 - max(lengths)
            assert len(found) <= math.ceil(sum(lengths) / target) + 2
