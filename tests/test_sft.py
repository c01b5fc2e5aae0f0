"""SFT stage: chat rows rendered with SmolLM2's template, only assistant tokens trained, packed
conversations with document masking, and the same losses under context parallelism.

Conversations are built from consecutive Austen paragraphs (user: one paragraph, assistant: the
next), two turns each, so the real chat template, real tokenizer and real text are exercised.
"""

import json

import numpy as np
import pytest

from launch import TINY_MODEL, rel_diff, run_from, save_initial_checkpoint
from dev import assets
from megatron_ext.arguments import parse_data_path
from megatron_ext.data import token_flags
from megatron_ext.data.chat import tokenize_conversation
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.data.preprocess import MalformedRow, output_prefix_for, preprocess
from megatron_ext.data.tokenizer import build_tokenizer

SEQ = 256


def conversations(count):
    novel = assets.require(assets.austen_novels) / "emma.txt"
    paras = [p.replace("\n", " ").strip() for p in novel.read_text().split("\n\n")]
    paras = [p for p in paras if 80 < len(p) < 600]
    rows = []
    for i in range(count):
        a, b, c, d = paras[4 * i: 4 * i + 4]
        rows.append({"messages": [
            {"role": "user", "content": a}, {"role": "assistant", "content": b},
            {"role": "user", "content": c}, {"role": "assistant", "content": d}]})
    return rows


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    hf_dir = str(assets.require(assets.smollm2_hf_dir))
    rows = conversations(60)
    jsonl = root / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = preprocess([str(jsonl)], str(root / "chat"), "HuggingFaceTokenizer", hf_dir,
                       json_keys=["messages"], append_eod=False, progress=False)
    assert stats.kind == "chat" and stats.documents == len(rows)
    return root, output_prefix_for(str(root / "chat"), "messages"), hf_dir, rows


def test_rendering_matches_the_template_and_targets_are_the_answers(chat_data):
    _, _, hf_dir, rows = chat_data
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    for row in rows[:5]:
        ids, targets = tokenize_conversation(tokenizer, row["messages"])
        reference = tokenizer._tok.apply_chat_template(row["messages"], tokenize=True)
        reference = reference["input_ids"] if hasattr(reference, "keys") else reference
        assert ids == list(reference)
        trained = tokenizer.detokenize([i for i, t in zip(ids, targets) if t])
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(f"{a}<|im_end|>\n" for a in answers)


def test_packed_conversations_mask_everything_but_answers(chat_data):
    root, prefix, hf_dir, rows = chat_data
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    train, _, _ = build_gpt_datasets(parse_data_path([prefix]), "100,0,0", SEQ, 7, tokenizer,
                                     [16, 0, 0], str(root / "cache"), packed_documents=True,
                                     sft=True)
    answers = [m["content"] + "<|im_end|>\n" for r in rows for m in r["messages"]
               if m["role"] == "assistant"]
    im_start = tokenizer._tok.convert_tokens_to_ids("<|im_start|>")
    system = tokenizer.tokenize("system")[0]
    trained_runs = 0
    for index in range(16):
        sample = train[index]
        mask = sample["loss_mask"].numpy().astype(bool)
        labels = sample["labels"].numpy()
        docs = sample["document_ids"].numpy()
        # Every trained label sits inside an assistant answer (checked on the decoded text).
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(int), [0]))))
        for start, stop in zip(edges[0::2], edges[1::2]):
            text = tokenizer.detokenize(labels[start:stop].tolist())
            assert any(text in answer for answer in answers), text
            trained_runs += 1
        # Conversations (each opens with the template's system turn) are the documents, although
        # <|im_end|>, the EOS token, closes every turn.
        tokens = sample["tokens"].numpy()
        opens = [p for p in range(1, SEQ - 1) if tokens[p] == im_start and tokens[p + 1] == system]
        assert (np.flatnonzero(np.diff(docs)) + 1).tolist() == opens
        # Positions restart where a new conversation starts.
        starts = np.flatnonzero(np.diff(docs)) + 1
        assert (sample["position_ids"].numpy()[starts] == 0).all()
    assert trained_runs > 16


@pytest.mark.parametrize("seq", [SEQ, 512])
def test_whole_conversation_packing_never_cuts_a_prompt_off(chat_data, capsys, seq):
    root, prefix, hf_dir, rows = chat_data
    tokenizer = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    conversations_ids = [tokenize_conversation(tokenizer, r["messages"])[0] for r in rows]
    longest = max(len(ids) for ids in conversations_ids)
    train, _, _ = build_gpt_datasets(parse_data_path([prefix]), "100,0,0", seq, 7, tokenizer,
                                     [24, 0, 0], str(root / f"cache-whole-{seq}"),
                                     packed_documents=True, sft=True, document_packing="whole")
    summary = train.packing_summary
    assert f"packing efficiency {summary['packing_efficiency']:.1%}" in capsys.readouterr().out
    cut = sum(len(ids) > seq for ids in conversations_ids)
    assert summary["truncated_documents"] == cut and (cut > 0) == (longest > seq)
    used = 0
    for index in range(summary["windows"]):
        sample = train[index]
        tokens, docs = sample["tokens"].numpy(), sample["document_ids"].numpy()
        mask = sample["loss_mask"].numpy().astype(bool)
        bounds = np.flatnonzero(np.diff(docs, prepend=-1)).tolist() + [seq]
        pieces = list(zip(bounds[:-1], bounds[1:]))
        # A partly filled window ends in padding: token 0 throughout, its own document.
        padding = pieces[-1] if not tokens[pieces[-1][0]:].any() else None
        content = pieces[:-1] if padding else pieces
        for start, stop in content:
            ids = tokens[start:stop].tolist()
            # Every document is a whole conversation, or the first --seq-length tokens of one:
            # its prompt is always in the window with its answers.
            assert any(ids == c or (len(c) > seq and ids == c[:seq]) for c in conversations_ids)
            assert (sample["position_ids"].numpy()[start:stop] == np.arange(stop - start)).all()
            used += stop - start
        if padding is not None:
            assert not mask[padding[0]:].any()  # padding is never a target
    assert summary["packing_efficiency"] == round(used / (summary["windows"] * seq), 4)
    assert 0.5 < summary["packing_efficiency"] <= 1.0
    if cut:
        with pytest.raises(ValueError, match="--overlong-documents truncate"):
            build_gpt_datasets(parse_data_path([prefix]), "100,0,0", seq, 7, tokenizer,
                               [4, 0, 0], None, packed_documents=True, sft=True,
                               document_packing="whole", overlong_documents="error")


def test_bad_chat_rows_are_named(tmp_path, chat_data):
    _, _, hf_dir, _ = chat_data
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(MalformedRow, match=r"bad.jsonl:1.*no assistant message"):
        preprocess([str(jsonl)], str(tmp_path / "bad"), "HuggingFaceTokenizer", hf_dir,
                   json_keys=["messages"], progress=False)


def test_sft_needs_chat_data(chat_data, books_data, tmp_path):
    prefix, tokenizer_model = books_data
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    with pytest.raises(ValueError, match="--objective sft"):
        build_gpt_datasets(parse_data_path([prefix]), "100,0,0", SEQ, 7, tokenizer, [4, 0, 0],
                           str(tmp_path), packed_documents=True, sft=True)


@pytest.mark.multiprocess
def test_sft_losses_equal_under_context_parallelism(chat_data):
    root, prefix, hf_dir, _ = chat_data
    model = [*TINY_MODEL, "--seq-length", str(SEQ)]  # the last --seq-length wins
    data = ["--data-path", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", hf_dir, "--data-cache-path", str(root / "cache"),
            "--split", "100,0,0", "--objective", "sft"]
    init = save_initial_checkpoint(root, [*model, *data])

    def run(name, nproc, extra):
        return run_from(init, root, name, nproc, [*model, *data, *extra])

    single = run("cp1", 1, [])
    cp2 = run("cp2", 2, ["--context-parallel-size", "2"])
    for ref, got in zip(single, cp2):
        assert ref["loss_tokens"] == got["loss_tokens"]
        assert rel_diff(got["loss"], ref["loss"]) <= (1e-5 if ref["iteration"] == 1 else 1e-4)
    # Only answers are trained: far fewer loss tokens than tokens in the global batch.
    assert 0 < single[0]["loss_tokens"] < 0.8 * 4 * SEQ
