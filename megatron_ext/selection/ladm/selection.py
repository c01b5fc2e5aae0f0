"""Choose documents by score under a token budget, and summarise the choice.

Per-domain rule (default; the paper's and the released ``filter.py``'s): rank each domain by
score, take the top floor(n_domain * p / 100) documents of every domain for p = 1, 2, ..., 100 and
stop at the smallest integer percentile p whose selected tokens reach the budget. Every domain thus
keeps its share of the pool by document count (to within one document), so a domain whose scores
run high cannot crowd out the others. A document's domain is the ``domain`` its score row records
(``score --domain-key``); rows without one form a single domain named ``(none)`` and are counted.
Global rule (opt-in): the top-k documents overall, k the smallest count whose tokens reach the
budget. If the whole pool is short of the budget, everything scorable is selected and the summary
says so.

Tokens are counted by an explicit rule: ``document`` (default, as released) counts each selected
document's full token count (``num_tokens``), ``scored`` counts only its scored prefix
(``length``). Ties in score rank by id, so the selection is deterministic. Nothing is dropped
silently: unscored rows (per reason), exact duplicates and rows without a domain are counted in
the summary, and scores computed at different lengths are reported (they are not comparable).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_ext.selection.ladm.scores_io import InputError, document_id, parse_json_row

TOKEN_RULES = ("document", "scored")
NO_DOMAIN = "(none)"


@dataclass(frozen=True)
class ScoredDoc:
    doc_id: str
    domain: str
    score: float
    tokens: int


@dataclass
class ScoreTable:
    docs: List[ScoredDoc] = field(default_factory=list)
    unscored: Counter = field(default_factory=Counter)  # reason -> rows with score null
    duplicates: int = 0
    without_domain: int = 0  # scored rows with no domain, pooled as NO_DOMAIN
    settings: List[dict] = field(default_factory=list)
    # score file -> {scored length: documents}; more than one length means mixed scores
    lengths: Dict[str, Counter] = field(default_factory=dict)

    @property
    def unscorable(self) -> int:
        return sum(self.unscored.values())

    def scored_lengths(self) -> Counter:
        return sum(self.lengths.values(), Counter())


@dataclass
class Selection:
    rule: str
    budget: int
    docs: List[ScoredDoc]
    reached: bool
    percentile: Optional[int] = None

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.docs)


def load_scores(paths: Sequence[str], count_tokens: str = "document") -> ScoreTable:
    """Rows of one or more score files (e.g. every shard). Exact duplicate rows are counted and
    ignored; the same id with a different score is an error."""
    if count_tokens not in TOKEN_RULES:
        raise InputError(f"--count-tokens must be one of {TOKEN_RULES}, got {count_tokens!r}")
    table = ScoreTable()
    seen: Dict[str, tuple] = {}
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"--scores {path}: no such file")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                where = f"{path} line {number}"
                row = parse_json_row(line, where)
                missing = [k for k in ("id", "score", "length", "num_tokens") if k not in row]
                if missing:
                    raise InputError(f"{where}: missing {missing}; is this a score file written "
                                     "by `ladm_select.py score`?")
                key = str(row["id"])
                if key in seen:
                    if seen[key][1] != row["score"]:
                        raise InputError(f"{where}: id {key!r} scored again with a different "
                                         f"score (first at {seen[key][0]}); remove one of them")
                    table.duplicates += 1
                    continue
                seen[key] = (where, row["score"])
                if row.get("settings") not in table.settings:
                    table.settings.append(row.get("settings"))
                if row["score"] is None:
                    table.unscored[str(row.get("unscorable", "no reason recorded"))] += 1
                    continue
                tokens = row["num_tokens"] if count_tokens == "document" else row["length"]
                domain = row.get("domain")
                table.without_domain += domain is None
                table.lengths.setdefault(path, Counter())[int(row["length"])] += 1
                table.docs.append(ScoredDoc(key, NO_DOMAIN if domain is None else str(domain),
                                            float(row["score"]), int(tokens)))
    return table


def mixed_length_warning(table: ScoreTable) -> Optional[str]:
    """A warning naming every score file and the lengths its documents were scored at, when the
    scores were computed at more than one length (scores of different lengths do not compare)."""
    if len(table.scored_lengths()) < 2:
        return None
    lines = ["WARNING: the scores were computed at different lengths and are NOT comparable "
             "(the score depends on the length through its span count and weights); rescore "
             "without --score-short-documents, or select from one length only:"]
    for path, lengths in table.lengths.items():
        shown = ", ".join(f"{n} docs at {length} tokens"
                          for length, n in sorted(lengths.items(), reverse=True))
        lines.append(f"  {path}: {shown}")
    return "\n".join(lines)


def _ranked(docs: Iterable[ScoredDoc]) -> List[ScoredDoc]:
    return sorted(docs, key=lambda d: (-d.score, d.doc_id))


def select_per_domain(docs: Sequence[ScoredDoc], budget: int) -> Selection:
    by_domain: Dict[str, List[ScoredDoc]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    ranked = {d: _ranked(v) for d, v in sorted(by_domain.items())}
    cumulative = {d: [0, *accumulate(x.tokens for x in v)] for d, v in ranked.items()}
    for percentile in range(1, 101):
        counts = {d: len(v) * percentile // 100 for d, v in ranked.items()}
        if sum(cumulative[d][k] for d, k in counts.items()) >= budget:
            break
    chosen = [x for d, v in ranked.items() for x in v[:counts[d]]]
    selection = Selection("per-domain", budget, chosen, False, percentile)
    selection.reached = selection.tokens >= budget
    return selection


def select_global(docs: Sequence[ScoredDoc], budget: int) -> Selection:
    ranked = _ranked(docs)
    total, k = 0, 0
    while k < len(ranked) and total < budget:
        total += ranked[k].tokens
        k += 1
    return Selection("global", budget, ranked[:k], total >= budget)


def write_selected(input_path: str, id_key: str, selection: Selection, output_path: str) -> int:
    """Copy the selected rows of ``input_path`` (unchanged, in input order) to ``output_path``."""
    wanted = {d.doc_id for d in selection.docs}
    if not os.path.isfile(input_path):
        raise InputError(f"--input {input_path}: no such file")
    written = 0
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = output_path + ".tmp"
    with open(input_path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for number, line in enumerate(src, 1):
            where = f"{input_path} line {number}"
            doc_id = document_id(parse_json_row(line, where), id_key, number, where)
            if doc_id in wanted:
                dst.write(line if line.endswith("\n") else line + "\n")
                wanted.discard(doc_id)
                written += 1
    if wanted:
        os.remove(tmp)
        raise InputError(f"{len(wanted)} selected ids are not in --input {input_path} (e.g. "
                         f"{sorted(wanted)[0]!r}); pass the file that was scored, with the same "
                         "--id-key")
    os.replace(tmp, output_path)
    return written


def histogram(values: Sequence[float], edges: Sequence[float]) -> List[int]:
    counts = [0] * (len(edges) - 1)
    for v in values:
        i = next((n for n in range(len(edges) - 1) if v < edges[n + 1]), len(edges) - 2)
        counts[i] += 1
    return counts


def summarize(table: ScoreTable, selection: Selection, token_rule: str, bins: int = 20) -> dict:
    domains: Dict[str, dict] = {}
    for doc in table.docs:
        entry = domains.setdefault(doc.domain, {"pool_docs": 0, "pool_tokens": 0,
                                                "selected_docs": 0, "selected_tokens": 0})
        entry["pool_docs"] += 1
        entry["pool_tokens"] += doc.tokens
    for doc in selection.docs:
        domains[doc.domain]["selected_docs"] += 1
        domains[doc.domain]["selected_tokens"] += doc.tokens
    for entry in domains.values():
        entry["selected_share_of_domain_docs"] = round(
            entry["selected_docs"] / entry["pool_docs"], 6)
    scores = [d.score for d in table.docs]
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    edges = [lo + (hi - lo) * n / bins for n in range(bins + 1)]
    return {
        "rule": selection.rule,
        "percentile": selection.percentile,
        "budget_tokens": selection.budget,
        "token_count_rule": token_rule,
        "budget_reached": selection.reached,
        "selected_docs": len(selection.docs),
        "selected_tokens": selection.tokens,
        "pool_docs": len(table.docs),
        "pool_tokens": sum(d.tokens for d in table.docs),
        "unscorable_rows_ignored": table.unscorable,
        "unscorable_rows_by_reason": dict(sorted(table.unscored.items())),
        "duplicate_rows_ignored": table.duplicates,
        "docs_without_domain": table.without_domain,
        "scored_lengths": {str(k): v for k, v in sorted(table.scored_lengths().items())},
        "score_settings": table.settings,
        "domains": dict(sorted(domains.items())),
        "score_histogram": {"edges": edges, "pool": histogram(scores, edges),
                            "selected": histogram([d.score for d in selection.docs], edges)},
    }


def write_histogram_png(summary: dict, path: str) -> bool:
    """Score histogram (pool vs selected documents per score bin) as a PNG."""
    from megatron_ext import plots

    hist = summary["score_histogram"]
    edges = hist["edges"]
    bins = [f"{low:.3g}" for low in edges[:-1]]
    plots.bar_chart(path, f"{summary['rule']} selection: {summary['selected_docs']} of "
                          f"{summary['pool_docs']} documents",
                    bins, {"pool": hist["pool"], "selected": hist["selected"]},
                    "documents (bins labelled by their lower score edge)")
    return True
