"""Offline assets: real files from package registries, checked by what they contain."""

import json
import re
import time
import zipfile

import pytest

from dev import assets
from dev.assets import (
    AssetUnavailable,
    austen_novels,
    botchan_text,
    corpus_jsonl,
    mistral_sentencepiece_model,
    python_stdlib_files,
    require,
    smollm2_hf_dir,
)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _first_sentence_containing(text, phrase):
    start = text.index(phrase)
    end = text.index(".", start) + 1
    return " ".join(text[start:end].split())


# --------------------------------------------------------------------------- #
# require()
# --------------------------------------------------------------------------- #

def _missing_asset():
    raise AssetUnavailable("registry unreachable")


def test_require_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="registry unreachable"):
        require(_missing_asset)


def test_require_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(AssetUnavailable, match="registry unreachable"):
        require(_missing_asset)


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGATRON_EXT_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path.resolve()


def test_apt_download_refreshes_package_lists_once(monkeypatch, tmp_path):
    commands = []

    def fake_run(command, cwd=None):
        commands.append(command[:2])
        if command[:2] == ["apt-get", "download"] and len(commands) == 1:
            raise AssetUnavailable("E: Unable to locate package r-cran-janeaustenr")
        if command[:2] == ["apt-get", "download"]:
            (cwd / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"")

    monkeypatch.setattr(assets, "_run", fake_run)
    deb = assets._apt_download("r-cran-janeaustenr", tmp_path)
    assert deb.name == "r-cran-janeaustenr_1.0.0-1_all.deb"
    assert commands == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]


def test_apt_download_reports_why_it_failed(monkeypatch, tmp_path):
    def offline(command, cwd=None):
        raise AssetUnavailable(f"{command[1]}: Temporary failure resolving deb.debian.org")

    monkeypatch.setattr(assets, "_run", offline)
    with pytest.raises(AssetUnavailable, match="apt-get update also failed"):
        assets._apt_download("r-cran-janeaustenr", tmp_path)


def test_failed_verification_leaves_no_partial_asset(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGATRON_EXT_CACHE", str(tmp_path))

    def tampered_wheel(requirement, sha256, into, extra_args=()):
        wheel = into / "mistral_common-1.13.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(assets.MISTRAL_V1_MEMBER, b"not a sentencepiece model")
        return wheel

    monkeypatch.setattr(assets, "_pip_download", tampered_wheel)
    with pytest.raises(AssetUnavailable, match="sha256 mismatch"):
        mistral_sentencepiece_model()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent.name != ".locks"]
    assert leftovers == []


# --------------------------------------------------------------------------- #
# Mistral SentencePiece tokenizer
# --------------------------------------------------------------------------- #

def test_mistral_sentencepiece_round_trips_austen():
    import sentencepiece

    model_path = require(mistral_sentencepiece_model)
    emma = (require(austen_novels) / "emma.txt").read_text(encoding="utf-8")
    sentence = _first_sentence_containing(emma, "Emma Woodhouse, handsome")

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    ids = processor.encode(sentence)
    assert processor.vocab_size() == 32000
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id()) == (0, 1, 2)
    assert processor.decode(ids) == sentence
    assert 10 < len(ids) < len(sentence)  # real subwords, not bytes
    # Byte fallback: text outside the vocabulary still round-trips exactly.
    assert processor.decode(processor.encode("Emma 😀 エマ")) == "Emma 😀 エマ"


def test_mistral_folder_is_hf_loadable():
    from transformers import AutoTokenizer

    model_path = require(mistral_sentencepiece_model)
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent)
    assert len(tokenizer) == 32000
    ids = tokenizer("Emma Woodhouse")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Emma Woodhouse"


# --------------------------------------------------------------------------- #
# Corpora
# --------------------------------------------------------------------------- #

def test_austen_corpus_has_six_long_novels():
    documents = _read_jsonl(require(corpus_jsonl, "austen"))
    assert [doc["id"] for doc in documents] == [f"austen/{name}" for name in assets.AUSTEN_NOVELS]
    assert all(len(doc["text"]) > 400_000 for doc in documents)
    assert all(doc["source"] == "debian:r-cran-janeaustenr" for doc in documents)
    emma = documents[0]["text"]
    assert "Emma Woodhouse" in emma
    assert emma.lstrip().startswith("EMMA")


def test_stdlib_file_list_is_library_code_only():
    files = python_stdlib_files()
    relative = [path.relative_to(assets._stdlib_root()).as_posix() for path in files]
    assert relative == sorted(relative)
    assert "json/decoder.py" in relative and "os.py" in relative
    forbidden = re.compile(r"(^|/)(test|tests|idlelib|idle_test|site-packages)/")
    assert not [name for name in relative if forbidden.search(name)]
    assert python_stdlib_files() == files  # deterministic


def test_pystdlib_corpus_is_repository_level_code():
    documents = _read_jsonl(require(corpus_jsonl, "pystdlib"))
    by_id = {doc["id"]: doc["text"] for doc in documents}
    assert [doc["id"] for doc in documents] == sorted(by_id)
    assert sum("def " in text for text in by_id.values()) > 0.8 * len(documents)

    json_package = by_id["pystdlib/json"]
    headers = re.findall(r"^# file: (\S+)$", json_package, flags=re.MULTILINE)
    assert headers == sorted(headers)
    assert {"json/__init__.py", "json/decoder.py", "json/encoder.py"} <= set(headers)
    assert "def loads(" in json_package
    assert by_id["pystdlib/os"].startswith("# file: os.py\n")


def test_second_fetch_reuses_the_cache(monkeypatch):
    fetched = [require(mistral_sentencepiece_model), require(austen_novels),
               require(corpus_jsonl, "austen"), require(corpus_jsonl, "pystdlib")]
    mtimes = [path.stat().st_mtime_ns for path in fetched]

    def no_downloads(command, cwd=None):
        raise AssertionError(f"cached asset fetched again: {command}")

    monkeypatch.setattr(assets, "_run", no_downloads)
    started = time.perf_counter()
    again = [mistral_sentencepiece_model(), austen_novels(),
             corpus_jsonl("austen"), corpus_jsonl("pystdlib")]
    assert time.perf_counter() - started < 1.0
    assert again == fetched
    assert [path.stat().st_mtime_ns for path in again] == mtimes


# --------------------------------------------------------------------------- #
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------- #

def test_smollm2_config_matches_spec():
    config = json.loads((require(smollm2_hf_dir) / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True
    rope_theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert rope_theta == 100000
    assert config["vocab_size"] == 49152
    assert "quantization_config" not in config


def test_smollm2_greedy_completion_knows_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = require(smollm2_hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in completion, completion


# --------------------------------------------------------------------------- #
# Botchan (sentencepiece sdist)
# --------------------------------------------------------------------------- #

def test_botchan_book_and_toy_model():
    import sentencepiece

    directory = require(botchan_text)
    book = (directory / "botchan.txt").read_text(encoding="utf-8")
    assert "BOTCHAN" in book.upper() and "Gutenberg" in book
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(directory / "botchan_en_bpe_1000.model"))
    assert processor.vocab_size() == 1000
    sentence = "Because of an hereditary recklessness"
    assert processor.decode(processor.encode(sentence)) == sentence
