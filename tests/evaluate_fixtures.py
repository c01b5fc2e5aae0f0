"""Session fixtures for the evaluation tests: SmolLM2 as an fp32 Megatron checkpoint and a small
real-text evaluation corpus. Import them into a test module to use them."""

from __future__ import annotations

import json
import sys

import pytest

from launch import REPO_ROOT, run

# Characters of Austen per evaluation document: SmolLM2 needs about 4 characters per token, so
# "long" documents hold > 2048 tokens and "medium" ones 1024..2047.
LONG_CHARS, MEDIUM_CHARS = 10_000, 6_000


@pytest.fixture(scope="session")
def smollm2():
    """{"hf": HF folder} of SmolLM2-135M-Instruct (fails in CI when the asset is missing)."""
    from dev import assets

    return {"hf": str(assets.require(assets.smollm2_hf_dir))}


@pytest.fixture(scope="session")
def smollm2_megatron(smollm2, tmp_path_factory):
    """SmolLM2 converted to an fp32 Megatron checkpoint: {"hf", "mg", "flags"}."""
    mg = tmp_path_factory.mktemp("evaluate-smollm2") / "mg"
    run([sys.executable, f"{REPO_ROOT}/tools/convert_checkpoint.py", "hf-to-megatron",
         "--hf-dir", smollm2["hf"], "--megatron-dir", mg, "--dtype", "fp32", "--no-progress"],
        timeout=600)
    return {**smollm2, "mg": str(mg), "flags": (mg / "megatron_args.txt").read_text().split()}


@pytest.fixture(scope="session")
def austen_rows():
    from dev import assets

    with open(assets.require(assets.corpus_jsonl, "austen")) as f:
        return {row["id"]: row["text"] for row in map(json.loads, f)}


@pytest.fixture(scope="session")
def eval_jsonl(austen_rows, tmp_path_factory):
    """Held-out style documents from three novels, in this order: medium (1K-2K SmolLM2 tokens),
    too short for any evaluated length, long (> 2K), medium, and an empty row (skipped, counted)."""
    path = tmp_path_factory.mktemp("evaluate-data") / "eval.jsonl"
    docs = [austen_rows["austen/emma"][50_000:50_000 + MEDIUM_CHARS],
            "Chapter 1. It is a truth universally acknowledged.",
            austen_rows["austen/persuasion"][30_000:30_000 + LONG_CHARS],
            austen_rows["austen/northangerabbey"][40_000:40_000 + MEDIUM_CHARS],
            ""]
    with open(path, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def novels_jsonl(austen_rows, tmp_path_factory):
    """Two whole novels (the shortest), for haystacks cut from long real documents."""
    path = tmp_path_factory.mktemp("evaluate-novels") / "novels.jsonl"
    with open(path, "w") as f:
        for name in ("austen/persuasion", "austen/northangerabbey"):
            f.write(json.dumps({"text": austen_rows[name]}) + "\n")
    return str(path)
