"""Score a JSON-lines file with any scorer: shard, tokenize, batch, append, resume, report.

A scorer has ``name``, ``min_length()``, ``record()`` (its settings) and
``score(list of token-id lists, doc keys) -> list of dicts`` holding at least ``score``
(``scoring.CdsScorer``, ``delta_ppl.ProlongScorer``). ``prepare_run`` checks the input and the
output file before any model is loaded; ``score_file`` then does the work.

Only exact ``seq_length``-token prefixes are scored by default. The score depends on the length it
is computed at (the number of spans, the distance and position weights, the loop bounds), so a
document scored at its own shorter length is not comparable with full-length ones, and ranking both
together lets short documents crowd out long ones. LADM's paper and released scorer use exactly
32,768-token prefixes for that reason. A shorter document is written with ``score: null`` and the
reason in ``unscorable``; ``score_short_documents`` scores it at its own length instead (when the
formula fits it), and ``select`` then warns that the file mixes lengths.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

from tqdm import tqdm

from megatron_ext.selection.ladm.scores_io import (Document, InputError, InputScan, ScoreWriter,
                                         read_documents, recover_output, scan_input)


@dataclass
class ScoreOptions:
    text_key: str = "text"
    domain_key: Optional[str] = None
    id_key: str = "id"
    seq_length: int = 32768
    batch_size: int = 1
    num_shards: int = 1
    shard_index: int = 0
    model_name: str = ""       # recorded in every row, so a resume cannot mix models
    progress: bool = True
    score_short_documents: bool = False  # score prefixes shorter than seq_length at their length

    def __post_init__(self):
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise InputError(f"--shard-index must be in [0, --num-shards={self.num_shards}), "
                             f"got {self.shard_index}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seq_length < 1:
            raise InputError(f"--seq-length must be >= 1, got {self.seq_length}")


@dataclass
class ScoreReport:
    shard_rows: int = 0
    already_done: int = 0
    scored: int = 0
    unscorable: Counter = field(default_factory=Counter)
    scored_tokens: int = 0
    seconds: float = 0.0
    dropped_partial_bytes: int = 0

    def lines(self) -> List[str]:
        out = [f"shard rows: {self.shard_rows}; already scored before this run: "
               f"{self.already_done}; scored now: {self.scored} "
               f"({self.scored_tokens} tokens in {self.seconds:.1f} s, "
               f"{self.scored_tokens / max(self.seconds, 1e-9):.0f} tokens/s)"]
        if self.dropped_partial_bytes:
            out.append(f"dropped a partial last line ({self.dropped_partial_bytes} bytes) left "
                       "by an interrupted run; that document was scored again")
        if self.unscorable:
            out.append(f"unscorable (written with score null, never used for selection): "
                       f"{sum(self.unscorable.values())}: " +
                       "; ".join(f"{n} x {why}" for why, n in sorted(self.unscorable.items())))
        return out


@dataclass
class PreparedRun:
    """Everything checked before the model is loaded: input rows, output file, settings."""
    input_path: str
    output_path: str
    options: ScoreOptions
    settings: dict
    scan: InputScan
    done: Set[str]
    dropped_partial_bytes: int
    vocab_size: Optional[int]


def prepare_run(scorer_record: dict, input_path: str, output_path: str, options: ScoreOptions,
                vocab_size: Optional[int] = None) -> PreparedRun:
    """Validate every input row and recover the output file (fails early, before any model)."""
    scan = scan_input(input_path, options.text_key, options.domain_key, options.id_key,
                      vocab_size, options.num_shards, options.shard_index)
    settings = {"model": options.model_name, "seq_length": options.seq_length,
                "score_short_documents": options.score_short_documents, **scorer_record}
    done, dropped = recover_output(output_path, settings)
    stale = done - scan.ids
    if stale:
        raise InputError(f"--output {output_path} holds {len(stale)} ids that are not in "
                         f"--input {input_path} (e.g. {sorted(stale)[0]!r}); is it the output "
                         "of another input file?")
    return PreparedRun(input_path, output_path, options, settings, scan, done, dropped,
                       vocab_size)


def check_tokenizer(run: PreparedRun, tokenizer) -> None:
    if run.scan.text_rows and tokenizer is None:
        raise InputError(f"{run.input_path}: {run.scan.text_rows} rows carry text but the model "
                         "folder has no tokenizer; add tokenizer files to --model or "
                         "pre-tokenize into 'input_ids'")


def score_file(scorer, tokenizer, run: PreparedRun) -> ScoreReport:
    """Score the prepared shard's remaining documents, appending rows to its output."""
    options, scan, done, settings = run.options, run.scan, run.done, run.settings
    check_tokenizer(run, tokenizer)
    report = ScoreReport(shard_rows=scan.shard_rows,
                         dropped_partial_bytes=run.dropped_partial_bytes)
    min_length = scorer.min_length()

    pending: List[Tuple[dict, Optional[List[int]]]] = []
    start = time.perf_counter()
    with ScoreWriter(run.output_path) as writer, tqdm(
            total=scan.shard_rows, unit="doc", disable=not options.progress,
            desc=f"{scorer.name} shard {options.shard_index}/{options.num_shards}") as bar:

        def flush() -> None:
            jobs = [(row, ids) for row, ids in pending if ids is not None]
            if jobs:
                results = scorer.score([ids for _, ids in jobs], [row["id"] for row, _ in jobs])
                for (row, ids), result in zip(jobs, results):
                    row.update(result)
                    report.scored += 1
                    report.scored_tokens += len(ids)
            writer.write({**row, "settings": settings} for row, _ in pending)
            bar.update(len(pending))
            elapsed = time.perf_counter() - start
            bar.set_postfix(tok_s=f"{report.scored_tokens / max(elapsed, 1e-9):.0f}")
            pending.clear()

        for doc in read_documents(run.input_path, options.text_key, options.domain_key,
                                  options.id_key, run.vocab_size, options.num_shards,
                                  options.shard_index):
            if doc.doc_id in done:
                report.already_done += 1
                bar.update(1)
                continue
            row, ids = _prepare(doc, tokenizer, options, min_length)
            if ids is None:
                report.unscorable[row["unscorable"]] += 1
            pending.append((row, ids))
            if sum(ids is not None for _, ids in pending) >= options.batch_size:
                flush()
        flush()
    report.seconds = time.perf_counter() - start
    return report


def _prepare(doc: Document, tokenizer, options: ScoreOptions,
             min_length: int) -> Tuple[dict, Optional[List[int]]]:
    """The document's output row (score still missing) and its scored prefix, or None."""
    if doc.input_ids is not None:
        ids = doc.input_ids
    else:
        ids = tokenizer(doc.text, verbose=False)["input_ids"]
    prefix = ids[:options.seq_length]
    row = {"id": doc.doc_id, "domain": doc.domain, "length": len(prefix),
           "num_tokens": len(ids), "score": None}
    reason = _unscorable_reason(len(prefix), options, min_length)
    if reason:
        # one fixed text per run, so the report and `select` can count documents per reason
        row["unscorable"] = reason
        prefix = None
    return row, prefix


def _unscorable_reason(length: int, options: ScoreOptions, min_length: int) -> Optional[str]:
    if length < options.seq_length and not options.score_short_documents:
        return (f"shorter than --seq-length {options.seq_length} (pass --score-short-documents "
                "to score it at its own length)")
    if length < min_length:
        return f"shorter than {min_length} tokens, the least the score's formula needs"
    return None
