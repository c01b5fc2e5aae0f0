"""LADM data selection: exact blockwise scores, resume after a kill, budgeted selection.

Scores are checked against a naive reference read off full eager attention matrices, for a tiny
random Llama and for SmolLM2-135M on real text; the command-line tool is run end to end on real
corpora with a real tokenizer.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from dev import assets
from megatron_ext.selection.ladm import selection
from megatron_ext.selection.ladm.delta_ppl import (ProlongScorer, ProlongSettings, lds_from_perplexities,
                                                   sample_pairs)
from megatron_ext.selection.ladm.reference import reference_layer_scores
from megatron_ext.selection.ladm.scoring import (CdsScorer, CdsSettings, min_scorable_length, plan_spans,
                                                 probe_layer_scores)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import ladm_select  # noqa: E402

REL_TOL = 1e-4


def rel_diff(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------
# Fixtures: SmolLM2 and its tokenizer, real text, a tiny random Llama saved as an HF folder
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_dir():
    return assets.require(assets.smollm2_hf_dir)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def austen_ids(tokenizer):
    with open(assets.require(assets.corpus_jsonl, "austen")) as f:
        text = json.loads(f.readline())["text"]
    return tokenizer(text[:40000])["input_ids"]


def tiny_llama_config(vocab_size):
    from transformers import LlamaConfig

    # A sharper-than-default init so attention is far from uniform and the std term matters.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       initializer_range=0.2, max_position_embeddings=4096,
                       tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaModel

    torch.manual_seed(0)
    return LlamaModel(tiny_llama_config(len(tokenizer))).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_dir, tokenizer):
    """A tiny random LlamaForCausalLM folder with SmolLM2's real tokenizer."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer))).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smollm2_dir, name), out)
    return str(out)


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory):
    """Real documents from two domains (Python stdlib modules, Austen novels), some too short."""
    rows = []
    with open(assets.require(assets.corpus_jsonl, "pystdlib")) as f:
        for line in list(f)[:8]:
            r = json.loads(line)
            rows.append({"id": r["id"], "text": r["text"][:5000], "meta": {"set": "code"}})
    with open(assets.require(assets.corpus_jsonl, "austen")) as f:
        for line in f:
            r = json.loads(line)
            rows.append({"id": r["id"], "text": r["text"][:6000], "meta": {"set": "books"}})
    rows.append({"id": "a-note", "text": "Too short to score.", "meta": {"set": "books"}})
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


SCORE_FLAGS = ["--seq-length", "512", "--span", "16", "--domain-key", "meta.set",
               "--no-progress"]


def score_cli(model_dir, docs, output, *extra):
    return ladm_select.main(["score", "--model", model_dir, "--input", docs, "--output",
                             str(output), *SCORE_FLAGS, *extra])


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------
# The span plan follows the released loop bounds
# ------------------------------------------------------------------------------------------

def test_released_plan_at_32k_matches_the_spec():
    plan = plan_spans(32768, CdsSettings())
    query_spans = [s.start // 128 for s in plan.spans]
    assert query_spans == list(range(255, 18, -4))  # 60 spans, j = 255 ... 19
    assert sum(128 for _ in plan.spans) == 7680
    for span in plan.spans:
        key_spans = [u // 128 for u in span.key_starts]
        j = span.start // 128
        assert key_spans == list(range(j - 4, 0, -4)) and key_spans[-1] == 3
        assert span.key_end == span.start  # normalised over keys strictly before the span
    assert [len(s.key_starts) for s in (plan.spans[-1], plan.spans[0])] == [4, 63]
    shortest = min_scorable_length(CdsSettings())
    assert plan_spans(shortest, CdsSettings()).spans
    assert not plan_spans(shortest - 1, CdsSettings()).spans


def test_paper_plan_at_32k_matches_the_spec():
    plan = plan_spans(32768, CdsSettings(variant="paper"))
    assert [s.start // 128 for s in plan.spans] == list(range(16, 256, 4))
    for span in plan.spans:
        j = span.start // 128
        assert [u // 128 for u in span.key_starts] == list(range(j - 5, 0, -4))
        assert span.key_end == span.start + 128  # causal attention over spans 0..j
        assert span.weight == j / 256
    assert plan.reduce == "sum"


# ------------------------------------------------------------------------------------------
# Exact scores: blockwise probe == full eager attention matrices
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["code", "paper"])
def test_tiny_llama_matches_full_attention_reference(tiny_llama, austen_ids, variant):
    settings = CdsSettings(variant=variant, span=16)
    # a batch of two lengths: right padding must not change either document's score
    docs = [austen_ids[:512], austen_ids[600:1050]]
    ours = CdsScorer(tiny_llama, settings).layer_scores(docs)
    for doc, got in zip(docs, ours):
        (ref,) = reference_layer_scores(tiny_llama, doc, [settings], keep_all_layers=True)
        (layerwise,) = reference_layer_scores(tiny_llama, doc, [settings], keep_all_layers=False)
        assert layerwise == ref  # the two reference routes read the same eager matrices
        assert rel_diff(got, ref) <= REL_TOL, (got, ref)
        assert all(v > 0 for v in got)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["code", "paper"])
def test_probe_on_cuda_matches_cpu(tiny_llama, austen_ids, variant):
    import copy

    settings = CdsSettings(variant=variant, span=16)
    docs = [austen_ids[:512], austen_ids[600:1050]]
    on_cpu = CdsScorer(tiny_llama, settings).layer_scores(docs)
    on_gpu = CdsScorer(copy.deepcopy(tiny_llama).cuda(), settings).layer_scores(docs)
    for got, ref in zip(on_gpu, on_cpu):
        assert rel_diff(got, ref) <= REL_TOL


def test_smollm2_matches_full_attention_reference_at_2048(smollm2_dir, austen_ids):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    doc = austen_ids[:2048]
    assert len(doc) == 2048
    both = [CdsSettings(variant="code", span=64), CdsSettings(variant="paper", span=64)]
    # one layer's [9, 2048, 2048] matrix alive at a time: the same eager probabilities as
    # output_attentions=True, without holding all 30 layers (4.5 GB) at once
    references = reference_layer_scores(model, doc, both, keep_all_layers=False)
    ours = probe_layer_scores(model, [doc], both)  # both variants probed in one forward pass
    for settings, ref, (got,) in zip(both, references, ours):
        assert len(got) == 30
        assert rel_diff(got, ref) <= REL_TOL, (settings.variant, got, ref)
        assert abs(sum(got) - sum(ref)) / abs(sum(ref)) <= REL_TOL


# ------------------------------------------------------------------------------------------
# The command line: resume after SIGKILL, sharding, bad input
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, docs_jsonl):
    out = tmp_path_factory.mktemp("full") / "scores.jsonl"
    assert score_cli(tiny_model_dir, docs_jsonl, out) == 0
    return out


def test_score_rows_and_unscorable_documents(uninterrupted, docs_jsonl, capsys):
    rows = read_rows(uninterrupted)
    with open(docs_jsonl) as f:
        assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in f]
    short = [r for r in rows if r["score"] is None]
    assert "a-note" in {r["id"] for r in short}
    assert all(r["unscorable"].startswith("shorter than --seq-length 512") for r in short)
    assert {r["id"] for r in short} == {r["id"] for r in rows if r["num_tokens"] < 512}
    scored = [r for r in rows if r["score"] is not None]
    assert len(scored) >= 8 and {r["domain"] for r in scored} == {"code", "books"}
    for r in scored:
        assert r["length"] == 512 and len(r["layer_cds"]) == 2
        assert r["cds"] == pytest.approx(sum(r["layer_cds"]) / 2, rel=1e-12)
        assert r["settings"]["variant"] == "code" and r["settings"]["span"] == 16


def test_resume_after_kill_gives_the_uninterrupted_output(tmp_path, tiny_model_dir, docs_jsonl,
                                                          uninterrupted, capsys):
    out = tmp_path / "scores.jsonl"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tests", "append_kill_worker.py"), "ladm_select",
           "4", "score",
           "--model", tiny_model_dir, "--input", docs_jsonl, "--output", str(out), *SCORE_FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = out.read_text()
    assert not killed.endswith("\n")  # the kill tore the last line
    complete = killed.count("\n")
    assert 4 <= complete < len(read_rows(uninterrupted))

    assert score_cli(tiny_model_dir, docs_jsonl, out) == 0
    report = capsys.readouterr().out
    assert f"already scored before this run: {complete}" in report
    assert "dropped a partial last line" in report
    assert out.read_bytes() == uninterrupted.read_bytes()


def test_shards_partition_the_input(tmp_path, tiny_model_dir, docs_jsonl, uninterrupted):
    full = {r["id"]: r for r in read_rows(uninterrupted)}
    seen = []
    for shard in range(2):
        out = tmp_path / f"part{shard}.jsonl"
        assert score_cli(tiny_model_dir, docs_jsonl, out, "--num-shards", "2",
                         "--shard-index", str(shard), "--batch-size", "3") == 0
        for row in read_rows(out):
            seen.append(row["id"])
            if row["score"] is not None:  # batched with padding: same score up to rounding
                assert row["score"] == pytest.approx(full[row["id"]]["score"], rel=1e-5)
    assert sorted(seen) == sorted(full)


def test_resume_with_other_settings_is_refused(tmp_path, tiny_model_dir, docs_jsonl,
                                               uninterrupted, capsys):
    out = tmp_path / "scores.jsonl"
    shutil.copy(uninterrupted, out)
    assert score_cli(tiny_model_dir, docs_jsonl, out, "--variant", "paper") == 2
    assert "other settings" in capsys.readouterr().err
    assert out.read_bytes() == uninterrupted.read_bytes()


@pytest.mark.parametrize("row, message", [
    ('{"id": "x", "text": "fine", "meta": {"set": "a"}}\n{"id": "y", "text": "unterminated\n',
     "line 2: not valid JSON"),
    ('{"id": "x", "body": "no text field", "meta": {"set": "a"}}\n',
     "neither 'text' (--text-key) nor 'input_ids'"),
    ('{"id": "x", "input_ids": [1, 2, "3"], "meta": {"set": "a"}}\n',
     "list of non-negative integers"),
    ('{"id": "x", "input_ids": [1, 99999999], "meta": {"set": "a"}}\n',
     "outside the model's vocabulary"),
    ('{"id": "x", "text": "a", "meta": {"set": "a"}}\n'
     '{"id": "x", "text": "b", "meta": {"set": "a"}}\n', "duplicate id 'x'"),
    ('{"id": "x", "text": "a", "meta": {}}\n', "no field 'meta.set' (--domain-key)"),
])
def test_bad_input_is_refused_before_scoring(tmp_path, tiny_model_dir, capsys, row, message):
    docs = tmp_path / "bad.jsonl"
    docs.write_text(row)
    out = tmp_path / "scores.jsonl"
    assert score_cli(tiny_model_dir, str(docs), out) == 2
    err = capsys.readouterr().err
    assert message in err and str(docs) in err
    assert not out.exists()


@pytest.mark.parametrize("flags, flag", [
    (["--span", "0"], "--span must be >= 1"),
    (["--d-afs", "0"], "--d-afs must be >= 1"),
    (["--sink-spans", "-1"], "--sink-spans must be >= 0"),
    (["--seq-length", "200"], "--seq-length 200 is shorter than the 289 tokens"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--num-shards", "2", "--shard-index", "2"], "--shard-index must be in [0, --num-shards"),
    (["--scorer", "prolong-delta-ppl", "--no-std-weight"], "--no-std-weight ablate"),
    (["--scorer", "prolong-delta-ppl", "--prolong-pairs", "0"], "--prolong-pairs must be >= 1"),
])
def test_bad_score_flags_are_named(tmp_path, tiny_model_dir, docs_jsonl, capsys, flags, flag):
    out = tmp_path / "scores.jsonl"
    assert score_cli(tiny_model_dir, docs_jsonl, out, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("ladm_select.py score: error: ") and flag in err, err
    assert not out.exists()


@pytest.mark.parametrize("flags, flag", [
    (["--budget-tokens", "0"], "--budget-tokens must be >= 1"),
    (["--scores", "no-such-file.jsonl"], "--scores no-such-file.jsonl: no such file"),
    (["--count-tokens", "scored", "--input", "no-such-input.jsonl"], "--input no-such-input"),
])
def test_bad_select_flags_are_named(synthetic_pool, tmp_path, capsys, flags, flag):
    root, _ = synthetic_pool
    given = {"--scores": str(root / "scores.jsonl"), "--input": str(root / "docs.jsonl"),
             "--budget-tokens": "1000", "--output": str(tmp_path / "out.jsonl")}
    pairs = dict(zip(flags[::2], flags[1::2]))
    argv = [x for name, value in {**given, **pairs}.items() for x in (name, value)]
    assert ladm_select.main(["select", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ladm_select.py select: error: ") and flag in err, err


def test_select_without_scored_documents_says_why(synthetic_pool, tmp_path, capsys):
    root, _ = synthetic_pool
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps({"id": "tiny", "domain": None, "length": 3, "num_tokens": 3,
                                  "score": None, "unscorable": SHORT_REASON}) + "\n")
    assert ladm_select.main(["select", "--scores", str(scores), "--input",
                             str(root / "docs.jsonl"), "--budget-tokens", "1", "--output",
                             str(tmp_path / "out.jsonl")]) == 2
    assert f"no scored documents (1 rows with score null: 1 x {SHORT_REASON})" in \
        capsys.readouterr().err


def test_per_domain_and_global_top_k_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        ladm_select.main(["select", "--scores", "s", "--input", "i", "--budget-tokens", "1",
                          "--output", "o", "--per-domain", "--global-top-k"])
    assert exit_.value.code == 2
    assert "--global-top-k: not allowed with argument --per-domain" in capsys.readouterr().err


def test_pretokenized_rows_are_used_as_is(tmp_path, tiny_model_dir, tiny_llama, austen_ids):
    docs = tmp_path / "ids.jsonl"
    docs.write_text(json.dumps({"id": 7, "input_ids": austen_ids[:700]}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert ladm_select.main(["score", "--model", tiny_model_dir, "--input", str(docs),
                             "--output", str(out), "--seq-length", "512", "--span", "16",
                             "--no-progress"]) == 0
    (row,) = read_rows(out)
    assert row["id"] == "7" and row["length"] == 512 and row["num_tokens"] == 700
    assert row["domain"] is None
    from transformers import LlamaModel

    saved = LlamaModel.from_pretrained(tiny_model_dir).eval()
    expected = CdsScorer(saved, CdsSettings(span=16)).layer_scores([austen_ids[:512]])[0]
    assert rel_diff(row["layer_cds"], expected) <= 1e-6


# ------------------------------------------------------------------------------------------
# Exact-length scores and the ablation switches, against a naive computation of the published formulas
# ------------------------------------------------------------------------------------------

def eager_attention(model, ids):
    """Every layer's full causal attention probabilities [heads, L, L] (float64), read off
    eager attention: the L x L matrices the blockwise scorer never forms."""
    import copy

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([list(ids)]), output_attentions=True, use_cache=False)
    return [a[0].double() for a in out.attentions]


def released_probes(length, c):
    """The released scorer's loops with the defaults (d_afs = d_cds = 4, one sink span):
    (query start, key end, [(key start, distance weight)], position weight)."""
    interval = stride = 4 * c
    t = length - c
    while t > c + 4 * interval:
        keys, k = [], 1
        while t - k * interval >= c:
            keys.append((t - k * interval, k * interval / length))
            k += 1
        yield t, t, keys, t / length
        t -= stride


def paper_probes(length, c):
    """The paper's sums with the defaults (m = 1, n = 4, n0 = 16, d_afs = d_cds = 4)."""
    n_spans = length // c
    for j in range(16, n_spans, 4):
        keys = [(i * c, (j - i) / n_spans) for i in range(j - 5, 0, -4)]
        if len(keys) >= 2:
            yield j * c, (j + 1) * c, keys, j / n_spans


def naive_cds(probs, probes, c, use_std, use_length, mean):
    """One layer's CDS: AFS = std(PFS) * sum PFS * distance * position, either factor dropped
    by an ablation; mean (released) or sum (paper) over the query spans."""
    afs = []
    for start, key_end, keys, position in probes:
        rows = probs[:, start:start + c, :key_end]
        rows = rows / rows.sum(dim=-1, keepdim=True)  # normalised over the keys it may see
        mass = rows.sum(dim=1).mean(dim=0)
        pfs = torch.stack([mass[u:u + c].sum() for u, _ in keys])
        weights = torch.tensor([w for _, w in keys], dtype=torch.float64)
        spread = pfs.std(unbiased=True) if use_std else 1.0
        weighted = (pfs * weights).sum() * position if use_length else pfs.sum()
        afs.append(float(spread * weighted))
    return sum(afs) / len(afs) if mean else sum(afs)


ABLATIONS = [(True, True), (False, True), (True, False), (False, False)]  # (std, length)


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_ablation_switches_follow_the_formula(tiny_llama, austen_ids, variant):
    doc = austen_ids[:512]
    all_settings = [CdsSettings(variant=variant, span=16, std_weight=std, length_weight=length)
                    for std, length in ABLATIONS]
    ours = probe_layer_scores(tiny_llama, [doc], all_settings)  # one forward, four settings
    probes = list((released_probes if variant == "code" else paper_probes)(512, 16))
    full = None
    for (std, length), (got,) in zip(ABLATIONS, ours):
        expected = [naive_cds(probs, probes, 16, std, length, mean=variant == "code")
                    for probs in eager_attention(tiny_llama, doc)]
        assert rel_diff(got, expected) <= REL_TOL, (std, length, got, expected)
        full = full or got
        if (std, length) != (True, True):  # each switch really changes the score
            assert rel_diff(got, full) > 1e-2


def test_ablation_flags_reach_the_score_file(tmp_path, tiny_model_dir, austen_ids):
    from transformers import LlamaModel

    docs = tmp_path / "ids.jsonl"
    docs.write_text(json.dumps({"id": "d", "input_ids": austen_ids[:512]}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert ladm_select.main(["score", "--model", tiny_model_dir, "--input", str(docs),
                             "--output", str(out), "--seq-length", "512", "--span", "16",
                             "--no-std-weight", "--no-length-weight", "--no-progress"]) == 0
    (row,) = read_rows(out)
    assert row["settings"]["std_weight"] is False and row["settings"]["length_weight"] is False
    saved = LlamaModel.from_pretrained(tiny_model_dir).eval()
    probes = list(released_probes(512, 16))
    expected = [naive_cds(p, probes, 16, False, False, mean=True)
                for p in eager_attention(saved, austen_ids[:512])]
    assert rel_diff(row["layer_cds"], expected) <= REL_TOL


def test_short_documents_are_null_unless_flagged_and_select_warns_on_mixed_lengths(
        tmp_path, tiny_model_dir, austen_ids, capsys):
    from transformers import LlamaModel

    docs = tmp_path / "ids.jsonl"
    lengths = {"long": 700, "short": 400, "tiny": 100}  # 100 < 289, the formula's minimum
    docs.write_text("".join(json.dumps({"id": i, "input_ids": austen_ids[:n], "meta": {"set": i}})
                            + "\n" for i, n in lengths.items()))
    default, flagged = tmp_path / "default.jsonl", tmp_path / "flagged.jsonl"
    assert score_cli(tiny_model_dir, str(docs), default) == 0
    report = capsys.readouterr().out
    rows = {r["id"]: r for r in read_rows(default)}
    assert rows["long"]["score"] is not None and rows["long"]["length"] == 512
    for name in ("short", "tiny"):
        assert rows[name]["score"] is None and rows[name]["length"] == lengths[name]
        assert "shorter than --seq-length 512" in rows[name]["unscorable"]
        assert "--score-short-documents" in rows[name]["unscorable"]
    assert "score null, never used for selection): 2" in report

    assert score_cli(tiny_model_dir, str(docs), flagged, "--score-short-documents") == 0
    rows = {r["id"]: r for r in read_rows(flagged)}
    assert rows["tiny"]["score"] is None and "formula needs" in rows["tiny"]["unscorable"]
    assert rows["short"]["length"] == 400 and rows["short"]["settings"]["score_short_documents"]
    saved = LlamaModel.from_pretrained(tiny_model_dir).eval()
    probes = list(released_probes(400, 16))
    expected = [naive_cds(p, probes, 16, True, True, mean=True)
                for p in eager_attention(saved, austen_ids[:400])]
    assert rel_diff(rows["short"]["layer_cds"], expected) <= REL_TOL

    def select(scores):
        out = tmp_path / f"selected-{scores.stem}.jsonl"
        assert ladm_select.main(["select", "--scores", str(scores), "--input", str(docs),
                                 "--budget-tokens", "1", "--output", str(out)]) == 0
        return capsys.readouterr().err

    assert "WARNING" not in select(default)
    warning = select(flagged)
    assert "WARNING" in warning and "NOT comparable" in warning
    assert f"{flagged}: 1 docs at 512 tokens, 1 docs at 400 tokens" in warning


# ------------------------------------------------------------------------------------------
# Selection under a token budget
# ------------------------------------------------------------------------------------------

SHORT_REASON = "shorter than --seq-length 32768"
POOL_DOMAINS = {"ArXiv": 100, "FreeLaw": 50, "Wikipedia": 20, "(none)": 10}


@pytest.fixture(scope="module")
def synthetic_pool(tmp_path_factory):
    """Score and input files for 3 domains of 100 / 50 / 20 documents and 10 without a domain,
    plus noise rows. Wikipedia scores run low, as in the paper (a global top-k starves it)."""
    rng = random.Random(5)
    root = tmp_path_factory.mktemp("pool")
    docs, scores = [], []
    for domain, count, top in (("ArXiv", 100, 1.0), ("FreeLaw", 50, 1.0), ("Wikipedia", 20, 0.4),
                               (None, 10, 1.0)):
        for n in range(count):
            doc_id = f"{domain}-{n}"
            tokens = rng.randint(32768, 120000)
            docs.append({"id": doc_id, "text": "...", "meta": {"pile_set_name": domain}})
            scores.append({"id": doc_id, "domain": domain, "length": 32768,
                           "num_tokens": tokens, "score": rng.uniform(0, top)})
    docs.append({"id": "tiny", "text": "x"})
    scores.append({"id": "tiny", "domain": "ArXiv", "length": 3, "num_tokens": 3,
                   "score": None, "unscorable": SHORT_REASON})
    scores.append(dict(scores[0]))  # an exact duplicate row (e.g. shard files passed twice)
    rng.shuffle(docs)
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    return root, [s for s in scores[:-1] if s["score"] is not None]


def run_select(root, budget, *extra):
    out = root / f"selected-{budget}-{'-'.join(extra)}.jsonl"
    assert ladm_select.main(["select", "--scores", str(root / "scores.jsonl"), "--input",
                             str(root / "docs.jsonl"), "--budget-tokens", str(budget),
                             "--output", str(out), *extra]) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    return [r["id"] for r in read_rows(out)], summary


def top_per_domain(pool, percentile):
    chosen = []
    for domain in {s["domain"] for s in pool}:  # None, no domain, is one more domain
        ranked = sorted((s for s in pool if s["domain"] == domain), key=lambda s: -s["score"])
        chosen += ranked[:len(ranked) * percentile // 100]
    return chosen


@pytest.mark.parametrize("budget", [600_000, 2_500_000])
def test_per_domain_selection_is_the_default_and_keeps_domain_quotas(synthetic_pool, budget,
                                                                     capsys):
    root, pool = synthetic_pool
    selected, summary = run_select(root, budget)
    assert summary["rule"] == "per-domain"
    p = summary["percentile"]
    expected = top_per_domain(pool, p)
    assert sorted(selected) == sorted(s["id"] for s in expected)
    tokens = sum(s["num_tokens"] for s in expected)
    assert summary["selected_tokens"] == tokens >= budget and summary["budget_reached"]
    assert sum(s["num_tokens"] for s in top_per_domain(pool, p - 1)) < budget  # smallest p
    for domain, size in POOL_DOMAINS.items():
        quota = size * p / 100  # the same p % of every domain, to within one document
        assert abs(summary["domains"][domain]["selected_docs"] - quota) < 1, (domain, quota)
    assert summary["docs_without_domain"] == POOL_DOMAINS["(none)"]
    assert summary["unscorable_rows_ignored"] == 1 and summary["duplicate_rows_ignored"] == 1
    assert summary["unscorable_rows_by_reason"] == {SHORT_REASON: 1}
    assert summary["scored_lengths"] == {"32768": len(pool)}
    assert sum(summary["score_histogram"]["pool"]) == len(pool)
    assert sum(summary["score_histogram"]["selected"]) == len(selected)
    captured = capsys.readouterr()
    assert f"{POOL_DOMAINS['(none)']} scored rows have no domain" in captured.err
    assert "WARNING" not in captured.err  # one length only: no mixed-length warning
    assert f"ignored 1 rows with score null: {SHORT_REASON}" in captured.out
    from PIL import Image

    with Image.open(summary["histogram_png"]) as chart:  # drawn with Pillow, always
        assert chart.size[0] >= 760 and len(set(chart.convert("RGB").getdata())) > 3
    explicit, _ = run_select(root, budget, "--per-domain")
    assert explicit == selected


def test_global_top_k_flag_takes_the_smallest_top_k(synthetic_pool):
    root, pool = synthetic_pool
    budget = 1_000_000
    selected, summary = run_select(root, budget, "--global-top-k")
    ranked = sorted(pool, key=lambda s: -s["score"])
    k = len(selected)
    assert sorted(selected) == sorted(s["id"] for s in ranked[:k])
    assert sum(s["num_tokens"] for s in ranked[:k]) >= budget
    assert sum(s["num_tokens"] for s in ranked[:k - 1]) < budget
    assert summary["rule"] == "global" and summary["percentile"] is None
    # the low-scoring domain is crowded out, which is what the per-domain default prevents
    per_domain, by_domain = run_select(root, budget)
    assert summary["domains"]["Wikipedia"]["selected_docs"] < \
        by_domain["domains"]["Wikipedia"]["selected_docs"]
    assert sorted(per_domain) != sorted(selected)


def test_budget_beyond_the_pool_takes_everything_and_says_so(synthetic_pool, capsys):
    root, pool = synthetic_pool
    selected, summary = run_select(root, 10**12)
    assert len(selected) == len(pool) and not summary["budget_reached"]
    assert "NOT reached" in capsys.readouterr().out


def test_conflicting_duplicate_scores_are_refused(tmp_path):
    rows = [{"id": "a", "domain": "x", "length": 9, "num_tokens": 9, "score": s}
            for s in (0.1, 0.2)]
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(selection.InputError, match="line 2: id 'a' scored again"):
        selection.load_scores([str(path)])


# ------------------------------------------------------------------------------------------
# ProLong delta perplexity behind the same interface
# ------------------------------------------------------------------------------------------

def test_pair_sampling_is_complete_or_seeded():
    everything = sample_pairs(6, 500, random.Random(0))
    assert sorted(everything) == sorted((i, j) for i in range(6) for j in range(i))
    some = sample_pairs(40, 50, random.Random("11:doc"))
    assert len(set(some)) == 50 and all(0 <= j < i < 40 for i, j in some)
    assert some == sample_pairs(40, 50, random.Random("11:doc"))


@pytest.fixture(scope="module")
def smollm2_lm(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_prolong_perplexities_are_the_model_loss(smollm2_lm, austen_ids):
    scorer = ProlongScorer(smollm2_lm, ProlongSettings(span=32, seq_length=512))
    seg_i, seg_j = austen_ids[96:128], austen_ids[0:32]
    with torch.no_grad():
        alone = torch.exp(smollm2_lm(torch.tensor([seg_i]), labels=torch.tensor([seg_i])).loss)
        labels = torch.tensor([[-100] * 33 + seg_i[1:]])
        joined = torch.exp(smollm2_lm(torch.tensor([seg_j + seg_i]), labels=labels).loss)
    got = scorer._perplexities(torch.tensor([seg_i]), 0)[0]
    got_joined = scorer._perplexities(torch.tensor([seg_j + seg_i]), 32)[0]
    assert got == pytest.approx(float(alone), rel=1e-5)
    assert got_joined == pytest.approx(float(joined), rel=1e-5)


def released_lds(alone, conditioned, chunk_num, threshold):
    """The released ``compute_lds``/``compute_de`` logic, transcribed loop for loop: a full
    matrix of pair perplexities with inf where a pair was not sampled."""
    import numpy as np

    def dependency_entropy(logits):
        if len(logits) == 1:
            return 1
        x = np.exp(np.array(logits) - np.max(logits))
        x = x / x.sum()
        if 0 in x:
            x += 1e-12
            x /= np.sum(x)
        return np.clip((np.log(len(logits)) + np.sum(x * np.log(x))) / np.log(len(logits)), 0, 1)

    n = len(alone)
    delta = [[0.0] * n for _ in range(n)]
    entropy = [0.0] * n
    for i in range(n):
        row = []
        for j in range(i):
            delta[i][j] = alone[i] - conditioned.get((i, j), float("inf"))
            if (i, j) in conditioned:
                row.append(delta[i][j])
        if row:
            entropy[i] = dependency_entropy(row)
    lds = 0.0
    for i in range(n):
        for j in range(i):
            delta[i][j] /= alone[i]
            if delta[i][j] > threshold:
                lds += (delta[i][j] + np.clip((i - j) / (chunk_num - 1), 0, 1)) * entropy[i]
    return lds


def test_lds_formula_matches_the_released_computation():
    rng = random.Random(3)
    for trial in range(20):
        n = rng.randint(2, 30)
        alone = [rng.uniform(5, 400) for _ in range(n)]
        pairs = sample_pairs(n, rng.randint(1, 60), rng)
        conditioned = {p: alone[p[0]] * rng.uniform(0.3, 1.2) for p in pairs}
        ours = lds_from_perplexities(alone, pairs, [conditioned[p] for p in pairs], 256, 0.1)
        assert ours == pytest.approx(released_lds(alone, conditioned, 256, 0.1), rel=1e-9,
                                     abs=1e-12)


def test_prolong_score_is_the_lds_of_model_perplexities(smollm2_lm, austen_ids):
    """End to end on SmolLM2: segments, seeded pair sampling and each perplexity from the
    model's own loss, then the released LDS arithmetic."""
    settings = ProlongSettings(span=16, seq_length=1024, pairs=12, seed=11)
    doc = austen_ids[:100]  # 6 whole segments of 16 (the partial 7th is dropped), 15 pairs
    got = ProlongScorer(smollm2_lm, settings).score([doc], ["doc-1"])[0]["score"]

    segments = [doc[16 * n:16 * (n + 1)] for n in range(6)]
    pairs = sample_pairs(6, 12, random.Random("11:doc-1"))
    assert len(pairs) == 12

    def ppl(ids, labels):
        with torch.no_grad():
            return float(torch.exp(smollm2_lm(torch.tensor([ids]),
                                              labels=torch.tensor([labels])).loss))

    alone = [ppl(s, s) for s in segments]
    conditioned = {(i, j): ppl(segments[j] + segments[i], [-100] * 17 + segments[i][1:])
                   for i, j in pairs}
    expected = released_lds(alone, conditioned, 1024 // 16, 0.1)
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-4)


def test_prolong_scorer_from_the_command_line(tmp_path, tiny_model_dir, docs_jsonl):
    out = tmp_path / "prolong.jsonl"
    assert score_cli(tiny_model_dir, docs_jsonl, out, "--scorer", "prolong-delta-ppl",
                     "--prolong-pairs", "20") == 0
    rows = read_rows(out)
    scored = [r for r in rows if r["score"] is not None]
    assert scored and all(r["settings"]["scorer"] == "prolong-delta-ppl" for r in rows)
    assert all(r["score"] >= 0 for r in scored)
