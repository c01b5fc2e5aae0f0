"""LOGO preference data from long-context QA rows: chunk, score, pick evidence, generate, judge.

Input: rows ``{"context": str, "question": str, "answer": str}`` as JSON lines (a local ``.json``
array or ``.parquet`` file is read with the ``datasets`` package when it is installed). "answer"
(the gold answer) is needed only with ``score_with_answer`` or a judge; it is copied to the output.

Per row (LOGO, arXiv 2410.18533):
1. The context is cut into windows of ``chunk_tokens`` tokens of the model's tokenizer, decoded back
   to text (whitespace-stripped; whitespace-only windows are never kept).
2. Each chunk is scored by feature overlap with the question (plus the gold answer when
   ``score_with_answer``), ``logo_features.py``; the top ``num_chunks`` (K) are kept. A row with
   fewer than K usable chunks is dropped (``too_few_chunks``); so is a row whose best kept chunk
   (``overlap_rule="best"``) or worst kept chunk (``"all-kept"``, the released LOGO rule) shares
   fewer than ``min_overlap`` features (``min_overlap``).
3. Three prompts, chunks always in document order: all K kept chunks, the top K/2 and the bottom
   K/2 of the kept chunks. The model answers each greedily (``logo_generate.py``).
4. chosen = the answer with all K chunks; rejected = [answer with the top half, answer with the
   bottom half]. Every answer is the model's own, never the gold one. A row with an empty answer is
   dropped (``empty_answer``); so is one where a rejected answer equals the chosen one
   (``rejected_equals_chosen``, no preference to learn) unless ``keep_identical``.
5. With a judge model, each answer is judged correct / incorrect against the gold answer; a row is
   kept only if the chosen answer is correct and every rejected one incorrect (dropped as
   ``judge_chosen_incorrect`` or ``judge_rejected_correct``).

Output: one preference row per kept input row, in input order, as ``preprocess_preference`` reads
it: ``{"context": [K chunks], "question", "chosen", "rejected": [2 answers], "answer", "line",
"chunks": {"kept", "top_half", "bottom_half", "scores"}, "judge"?}`` ("line": the input line, or
row number for a ``datasets`` file; "chunks": chunk indices in the document and the kept chunks'
scores). Every other processed row goes to ``<stem>.dropped.jsonl`` as ``{"line", "reason"}``.

Resuming. Both files are append-only, one flushed line per row; the settings are pinned in
``<stem>.settings.json``. Rerunning the same command skips lines already in either file and drops
a torn last line left by a kill. Generation batches are fixed blocks of ``batch_size`` input lines
(``(line - 1) // batch_size``); a block that was only partly written is generated again as a
whole, so padding and batch composition, hence the greedy answers, are the same as in an
uninterrupted run: the output after a kill and a resume is byte-identical.

Bad rows (invalid JSON, not an object, missing or non-string fields, empty context or question)
stop the run with ``FILE:LINE`` and the field before any model is loaded, or are counted per
reason and left out with ``skip_bad_rows`` (the preference preprocessor's policy).
``<stem>.summary.json``: kept and dropped rows per reason, skipped bad rows, the feature extractor
that ran and the settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from typing import Dict, Iterator, List, Optional, Set, Tuple, Union

from tqdm import tqdm

from megatron_ext.data.logo_features import (DEFAULT_SPACY_MODEL, ChunkSelection,
                                             build_extractor, select_chunks)
from megatron_ext import jsonl
from megatron_ext.data.preference_rows import (MISSING_FIELD, NOT_OBJECT, BadPreferenceRow,
                                               _text, preference_row_error)
from megatron_ext.errors import UserError

# Why a well-formed row is not kept (the dropped-rows file and the summary use these names).
TOO_FEW_CHUNKS = "too_few_chunks"
MIN_OVERLAP = "min_overlap"
EMPTY_ANSWER = "empty_answer"
IDENTICAL = "rejected_equals_chosen"
JUDGE_CHOSEN_INCORRECT = "judge_chosen_incorrect"
JUDGE_REJECTED_CORRECT = "judge_rejected_correct"

OVERLAP_RULES = ("best", "all-kept")
DATASETS_SUFFIXES = (".parquet", ".arrow")


@dataclasses.dataclass
class BuildOptions:
    model: str
    chunk_tokens: int = 1024
    num_chunks: int = 16
    min_overlap: int = 3
    overlap_rule: str = "best"
    score_with_answer: bool = False
    features: str = "auto"
    spacy_model: str = DEFAULT_SPACY_MODEL
    max_new_tokens: int = 512
    batch_size: int = 4
    chat_template: bool = True
    judge_model: Optional[str] = None
    keep_identical: bool = False
    skip_bad_rows: bool = False
    max_rows: Optional[int] = None
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        for flag, value, least in (("--chunk-tokens", self.chunk_tokens, 1),
                                   ("--num-chunks", self.num_chunks, 2),
                                   ("--min-overlap", self.min_overlap, 0),
                                   ("--max-new-tokens", self.max_new_tokens, 1),
                                   ("--batch-size", self.batch_size, 1),
                                   ("--max-rows", 1 if self.max_rows is None else self.max_rows,
                                    1)):
            if value < least:
                raise UserError(f"{flag} must be at least {least}, got {value}")
        if self.overlap_rule not in OVERLAP_RULES:
            raise UserError(f"--overlap-rule must be one of {', '.join(OVERLAP_RULES)}, got "
                            f"{self.overlap_rule!r}")
        for flag, path in (("--model", self.model), ("--judge-model", self.judge_model)):
            if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
                raise UserError(f"{flag} {path}: no config.json; pass a Hugging Face model "
                                "folder")

    @property
    def needs_answer(self) -> bool:
        return self.score_with_answer or self.judge_model is not None


@dataclasses.dataclass(frozen=True)
class QARow:
    line: int
    where: str
    context: str
    question: str
    answer: Optional[str]


# --------------------------------------------------------------------------- #
# Input
# --------------------------------------------------------------------------- #

def _text_field(row: dict, key: str, where: str, required: bool) -> Optional[str]:
    if row.get(key) is None:
        if required:
            raise BadPreferenceRow(f"{where}: field {key!r} is missing; every row needs "
                                   "'context', 'question'" + (" and 'answer'" if key == "answer"
                                                              else ""), MISSING_FIELD)
        return None
    return _text(row[key], where, key).strip()  # a non-empty string, else BadPreferenceRow


def parse_qa(row, line: int, where: str, need_answer: bool) -> QARow:
    """One input row (a JSON line or a ``datasets`` row) -> QARow, or BadPreferenceRow."""
    if isinstance(row, str):
        row = jsonl.parse_object(row, where, preference_row_error,
                                 "a JSON object with 'context', 'question' and 'answer'")
    if not isinstance(row, dict):
        raise BadPreferenceRow(f"{where}: expected a JSON object with 'context', 'question' and "
                               f"'answer', got {type(row).__name__}", NOT_OBJECT)
    context = _text_field(row, "context", where, True)
    question = _text_field(row, "question", where, True)
    answer = _text_field(row, "answer", where, need_answer)
    return QARow(line, where, context, question, answer)


def _is_json_array(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        while True:
            char = f.read(1)
            if not char or not char.isspace():
                return char == "["


def _dataset_rows(path: str) -> Iterator[Tuple[int, str, object]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"--input {path}: reading a .json array or a .parquet / .arrow file "
                        "needs the 'datasets' package (pip install datasets); or convert it to "
                        "JSON lines (one {\"context\", \"question\", \"answer\"} object per line)"
                        ) from None
    suffix = os.path.splitext(path)[1].lower()
    kind = {".parquet": "parquet", ".arrow": "arrow"}.get(suffix, "json")
    dataset = datasets.load_dataset(kind, data_files=path, split="train")
    for index, row in enumerate(dataset, start=1):
        yield index, f"{path}:row {index}", row


def _jsonl_rows(path: str) -> Iterator[Tuple[int, str, object]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():  # blank lines are passed over, as the preference preprocessor does
                yield number, f"{path}:{number}", line


def input_rows(path: str, max_rows: Optional[int] = None) -> Iterator[Tuple[int, str, object]]:
    """(line number, where, raw row) of the first ``max_rows`` non-blank rows."""
    if os.path.splitext(path)[1].lower() in DATASETS_SUFFIXES or (
            path.lower().endswith(".json") and _is_json_array(path)):
        rows = _dataset_rows(path)
    else:
        rows = _jsonl_rows(path)
    for count, item in enumerate(rows, start=1):
        if max_rows is not None and count > max_rows:
            return
        yield item


def read_qa(path: str, options: BuildOptions, bad: Optional[Counter] = None
            ) -> Iterator[QARow]:
    """Valid rows; a bad row raises (or, with ``skip_bad_rows``, is counted in ``bad``)."""
    for number, where, raw in input_rows(path, options.max_rows):
        try:
            yield parse_qa(raw, number, where, options.needs_answer)
        except BadPreferenceRow as err:
            if not options.skip_bad_rows:
                raise
            if bad is not None:
                bad[err.reason] += 1


# --------------------------------------------------------------------------- #
# Output files (append-only, resumable)
# --------------------------------------------------------------------------- #

def output_files(output: str) -> Dict[str, str]:
    stem = os.path.splitext(output)[0]
    return {"output": output, "dropped": stem + ".dropped.jsonl",
            "settings": stem + ".settings.json", "summary": stem + ".summary.json"}


def recover_lines(path: str, flag: str) -> Tuple[List[dict], int]:
    """Rows already in ``path`` and the bytes of a torn last line cut from it (a killed run)."""
    def accept(row, number: int) -> None:
        if not isinstance(row, dict) or not isinstance(row.get("line"), int):
            raise UserError(f"{flag} {path}:{number} has no 'line' number; it was not written "
                            "by this builder: choose another --output")

    def damaged(number: int) -> Exception:
        return UserError(f"{flag} {path}:{number} is not valid JSON; the file is damaged "
                         "before its last line: move it away and rebuild")

    return jsonl.recover_appended(path, accept, damaged)


def pin_settings(path: str, settings: dict, have_rows: bool) -> None:
    """Write the run's settings once; a resume must use the same ones."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings)
                             if found.get(k) != settings.get(k))
            raise UserError(f"--output was started with other settings ({', '.join(changed)} "
                            f"differ; see {path}); resume with the same flags or choose a new "
                            "--output")
        return
    if have_rows:
        raise UserError(f"--output already holds rows but {path} is missing; move the old "
                        "output away or restore the settings file")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------- #
# Building
# --------------------------------------------------------------------------- #

@dataclasses.dataclass
class Candidate:
    row: QARow
    chunks: List[str]
    selection: ChunkSelection

    def texts(self, indices: List[int]) -> List[str]:
        return [self.chunks[i] for i in indices]


class Builder:
    """Chunking and scoring (cheap, per row) and the model work (per block of rows)."""

    def __init__(self, options: BuildOptions, tokenizer, features):
        self.options = options
        self.tokenizer = tokenizer
        self.features = features
        self.lm = None
        self.judge_lm = None

    def chunk(self, context: str) -> List[str]:
        ids = self.tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
        step = self.options.chunk_tokens
        return [self.tokenizer.decode(ids[i:i + step]).strip() for i in range(0, len(ids), step)]

    def prepare(self, row: QARow) -> Union[Candidate, str]:
        """The row's chunk selection, or the reason it is dropped before generation."""
        options = self.options
        chunks = self.chunk(row.context)
        query = self.features(row.question)
        if options.score_with_answer:
            query = query | self.features(row.answer)
        selection = select_chunks(chunks, query, self.features, options.num_chunks,
                                  usable=[bool(c) for c in chunks])
        if selection is None:
            return TOO_FEW_CHUNKS
        overlap = selection.best if options.overlap_rule == "best" else selection.worst_kept
        if overlap < options.min_overlap:
            return MIN_OVERLAP
        return Candidate(row, chunks, selection)

    def load_models(self) -> None:
        from megatron_ext.data.logo_generate import CausalLM

        o = self.options
        if self.lm is None:
            self.lm = CausalLM(o.model, o.dtype, o.device, o.chat_template)
        if o.judge_model is not None and self.judge_lm is None:
            same = os.path.realpath(o.judge_model) == os.path.realpath(o.model)
            self.judge_lm = self.lm if same else CausalLM(o.judge_model, o.dtype, o.device,
                                                          o.chat_template)

    def answer(self, candidates: List[Candidate]) -> List[Tuple[str, List[str]]]:
        """(chosen, [rejected top half, rejected bottom half]) per candidate, one block."""
        from megatron_ext.data.logo_generate import generation_prompt

        def run(pick) -> List[str]:
            prompts = [generation_prompt(c.texts(pick(c.selection)), c.row.question)
                       for c in candidates]
            return self.lm.generate(prompts, self.options.max_new_tokens)

        full = run(lambda s: s.kept)
        top = run(lambda s: s.top_half)
        bottom = run(lambda s: s.bottom_half)
        return [(f, [t, b]) for f, t, b in zip(full, top, bottom)]

    def judge(self, candidates: List[Candidate], answers) -> List[Dict]:
        items = [(c.row.question, c.row.answer, a)
                 for c, (chosen, rejected) in zip(candidates, answers)
                 for a in [chosen] + rejected]
        verdicts = self.judge_lm.judge(items, 2 * self.options.batch_size)
        per_row = len(items) // max(len(candidates), 1)
        return [{"chosen": verdicts[i], "rejected": verdicts[i + 1:i + per_row]}
                for i in range(0, len(verdicts), per_row)]

    def finish(self, candidate: Candidate, chosen: str, rejected: List[str],
               verdict: Optional[dict]) -> Union[dict, str]:
        """The output row, or the reason the row is dropped after generation."""
        if not chosen or not all(rejected):
            return EMPTY_ANSWER
        if not self.options.keep_identical and chosen in rejected:
            return IDENTICAL
        if verdict is not None:
            if not verdict["chosen"]:
                return JUDGE_CHOSEN_INCORRECT
            if any(verdict["rejected"]):
                return JUDGE_REJECTED_CORRECT
        s, row = candidate.selection, candidate.row
        out = {"context": candidate.texts(s.kept), "question": row.question, "chosen": chosen,
               "rejected": rejected}
        if row.answer is not None:
            out["answer"] = row.answer
        out["line"] = row.line
        out["chunks"] = {"kept": s.kept, "top_half": s.top_half, "bottom_half": s.bottom_half,
                         "scores": [s.scores[i] for i in s.kept]}
        if verdict is not None:
            out["judge"] = verdict
        return out


def _settings(input_path: str, options: BuildOptions, feature_name: str) -> dict:
    from megatron_ext.selection.ladm.loading import resolve_device, resolve_dtype

    dtype = resolve_dtype(options.dtype, resolve_device(options.device))
    return {"input": os.path.abspath(input_path), "model": os.path.abspath(options.model),
            "judge_model": None if options.judge_model is None
            else os.path.abspath(options.judge_model),
            "chunk_tokens": options.chunk_tokens, "num_chunks": options.num_chunks,
            "min_overlap": options.min_overlap, "overlap_rule": options.overlap_rule,
            "score_with_answer": options.score_with_answer, "features": feature_name,
            "max_new_tokens": options.max_new_tokens, "batch_size": options.batch_size,
            "chat_template": options.chat_template, "keep_identical": options.keep_identical,
            "dtype": str(dtype).replace("torch.", "")}


def _blocks(rows: Iterator[QARow], batch_size: int) -> Iterator[List[QARow]]:
    """Rows grouped by (line - 1) // batch_size: fixed blocks whatever was done before."""
    block: List[QARow] = []
    for row in rows:
        if block and (row.line - 1) // batch_size != (block[0].line - 1) // batch_size:
            yield block
            block = []
        block.append(row)
    if block:
        yield block


def build_logo_data(input_path: str, output_path: str, options: BuildOptions) -> dict:
    """Build (or resume building) the preference file; returns the summary (also written)."""
    options.check()
    if not os.path.isfile(input_path):
        raise UserError(f"--input {input_path}: no such file")
    files = output_files(output_path)
    if os.path.abspath(output_path) == os.path.abspath(input_path):
        raise UserError("--output must differ from --input")

    # Every input row is checked before anything is loaded.
    bad: Counter = Counter()
    total = sum(1 for _ in read_qa(input_path, options, bad))
    feature_name, features = build_extractor(options.features, options.spacy_model)
    settings = _settings(input_path, options, feature_name)

    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    kept_rows, torn_kept = recover_lines(files["output"], "--output")
    dropped_rows, torn_dropped = recover_lines(files["dropped"], "--output's dropped-rows file")
    pin_settings(files["settings"], settings, bool(kept_rows or dropped_rows))
    done: Set[int] = set()
    dropped = Counter()
    for row in kept_rows + dropped_rows:
        if row["line"] in done:
            raise UserError(f"--output {output_path}: input line {row['line']} was written "
                            "twice; the output files are damaged, rebuild them")
        done.add(row["line"])
    dropped.update(r["reason"] for r in dropped_rows)
    kept = len(kept_rows)
    already_done = len(done)

    from transformers import AutoTokenizer

    builder = Builder(options, AutoTokenizer.from_pretrained(options.model), features)
    start = time.perf_counter()
    processed = 0
    with jsonl.AppendWriter(files["output"]) as out, jsonl.AppendWriter(files["dropped"]) as drop, tqdm(
            total=total, unit="row", disable=not options.progress, desc="LOGO data") as bar:
        for block in _blocks(read_qa(input_path, options), options.batch_size):
            todo = [r for r in block if r.line not in done]
            if not todo:
                bar.update(len(block))
                continue
            # The whole block is prepared and generated, done rows too: same batch as before.
            prepared = [builder.prepare(r) for r in block]
            candidates = [p for p in prepared if isinstance(p, Candidate)]
            results: Dict[int, Union[dict, str]] = {}
            if any(c.row.line not in done for c in candidates):
                builder.load_models()
                answers = builder.answer(candidates)
                verdicts = builder.judge(candidates, answers) if builder.judge_lm else \
                    [None] * len(candidates)
                for c, (chosen, rejected), v in zip(candidates, answers, verdicts):
                    results[c.row.line] = builder.finish(c, chosen, rejected, v)
            for row, prep in zip(block, prepared):
                if row.line in done:
                    continue
                result = results.get(row.line, prep)
                if isinstance(result, dict):
                    out.write([result])
                    kept += 1
                else:
                    drop.write([{"line": row.line, "reason": result}])
                    dropped[result] += 1
                processed += 1
            bar.update(len(block))
            bar.set_postfix(kept=kept, dropped=sum(dropped.values()))

    summary = {
        "input": input_path, "output": output_path, "dropped_rows_file": files["dropped"],
        "rows": total + sum(bad.values()), "kept": kept, "dropped": dict(sorted(dropped.items())),
        "skipped_bad_rows": dict(sorted(bad.items())), "feature_extractor": feature_name,
        "scored_with": "question + gold answer" if options.score_with_answer else "question",
        "chosen": "answer with all K kept chunks",
        "rejected": ["answer with the top K/2 kept chunks",
                     "answer with the bottom K/2 kept chunks"],
        "judge": None if options.judge_model is None else
        "keep iff chosen judged correct and every rejected judged incorrect",
        "settings": settings,
        "this_run": {"already_done": already_done, "processed": processed,
                     "seconds": round(time.perf_counter() - start, 3),
                     "torn_lines_dropped": int(bool(torn_kept)) + int(bool(torn_dropped))},
    }
    with open(files["summary"] + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(files["summary"] + ".tmp", files["summary"])
    return summary
