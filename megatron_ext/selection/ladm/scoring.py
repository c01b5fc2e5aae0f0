"""Exact, blockwise LADM contextual dependency scores (CDS) over a Hugging Face causal LM.

The model runs its normal forward pass with SDPA attention. A registered attention function sees
every layer's post-RoPE queries and keys on their way into SDPA and, for the few probed query spans
only, computes the exact attention mass on the sampled key spans with one extra fused SDPA call per
span (see ``span_pfs``): the kernel's online softmax is the blockwise log-sum-exp over the prefix,
so nothing of size L x L (nor span x L) is ever held.

Two variants:

``code`` (default), the released ``ZNLP/LADM`` scorer. Query spans start at t = L-c, L-c-s, ...
while t > sink + 4*Delta (c = span, Delta = c*d_afs, s = c*d_cds, sink = c*sink_spans), so they
are anchored at the document's end. Each query row is renormalised over the keys strictly before
the span, [0, t). Key spans start at t - k*Delta (k = 1, 2, ...) while >= sink. Per query span:
PFS_k = attention mass of the span's rows on key span k, summed over rows, averaged over heads;
AFS = std_unbiased(PFS) * sum_k PFS_k * (k*Delta/L) * (t/L). Layer CDS = mean of AFS.

``paper``, the paper's formulas. N = L // c spans from the start. Query spans j = n0, n0+d_cds,
... <= N-1; each row uses the model's own causal attention over spans 0..j. Key spans
i = j-n-1, j-n-1-d_afs, ... >= m (n = local_spans most recent spans excluded, m = sink_spans).
AFS(j) = std_unbiased(PFS) * sum_i (j-i)/N * PFS(i, j); layer CDS = sum_j (j/N) * AFS(j).

Both: CDS = mean of layer CDS over all layers (heads and layers equally weighted, as released).

Ablations (the released ``--ablation`` choices, paper Table 6), as two independent switches:
``std_weight=False`` drops the std factor (released ``no_std``); ``length_weight=False`` drops the
distance and position weights, (k*Delta/L or (j-i)/N) and (t/L or j/N), setting them to 1 (released
``no_len_weight``; the paper's "no length" ablation). The span plan itself is unchanged, so an
ablated score looks at exactly the same attention mass as the full one.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

VARIANTS = ("code", "paper")
PROBE_ATTENTION = "ladm_probe_sdpa"


@dataclass(frozen=True)
class CdsSettings:
    variant: str = "code"
    span: int = 128
    d_afs: int = 4
    d_cds: int = 4
    sink_spans: int = 1
    first_span: int = 16   # paper variant: n0, the first query span
    local_spans: int = 4   # paper variant: n, most recent spans left out of the PFS list
    std_weight: bool = True     # False: the released ``no_std`` ablation
    length_weight: bool = True  # False: the released ``no_len_weight`` ablation

    def __post_init__(self):
        # Each field is the command-line flag of the same name (span -> --span), so the message
        # names the flag to change.
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("span", "d_afs", "d_cds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("sink_spans", "first_span", "local_spans"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")

    def record(self) -> dict:
        """The settings as written into every score row."""
        record = {"scorer": CdsScorer.name, **asdict(self)}
        if self.variant == "code":  # unused by the released formula; keep rows unambiguous
            del record["first_span"], record["local_spans"]
        return record


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class QuerySpan:
    """One probed query span: rows [start, start+span) against the keys [0, key_end)."""
    start: int
    key_end: int                    # > start: causal inside the query span (paper variant)
    key_starts: Tuple[int, ...]     # sampled key spans [u, u+span)
    key_weights: Tuple[float, ...]  # distance weight of each sampled key span
    weight: float                   # position weight of this span's AFS


@dataclass(frozen=True)
class ScorePlan:
    length: int
    spans: Tuple[QuerySpan, ...]
    reduce: str  # how a layer's AFS values combine: "mean" (code) or "sum" (paper)
    std_weight: bool = True  # multiply each AFS by the std of its PFS values


def without_length_weights(plan: ScorePlan) -> ScorePlan:
    """The same spans with every distance and position weight set to 1 (no_len_weight)."""
    spans = tuple(replace(span, key_weights=(1.0,) * len(span.key_weights), weight=1.0)
                  for span in plan.spans)
    return replace(plan, spans=spans)


def plan_spans(length: int, settings: CdsSettings) -> ScorePlan:
    """Which query and key spans the score of a ``length``-token document looks at, with the
    weights the chosen ablations leave."""
    plan = replace(_full_plan(length, settings), std_weight=settings.std_weight)
    return plan if settings.length_weight else without_length_weights(plan)


def _full_plan(length: int, settings: CdsSettings) -> ScorePlan:
    c = settings.span
    spans: List[QuerySpan] = []
    if settings.variant == "code":
        interval, stride, sink = c * settings.d_afs, c * settings.d_cds, c * settings.sink_spans
        t = length - c
        while t > sink + 4 * interval:
            ks = range(1, (t - sink) // interval + 1)
            spans.append(QuerySpan(t, t, tuple(t - k * interval for k in ks),
                                   tuple(k * interval / length for k in ks), t / length))
            t -= stride
        return ScorePlan(length, tuple(spans), "mean")
    n_spans = length // c
    for j in range(settings.first_span, n_spans, settings.d_cds):
        keys = range(j - settings.local_spans - 1, settings.sink_spans - 1, -settings.d_afs)
        if len(keys) < 2:  # an unbiased std needs two values
            continue
        spans.append(QuerySpan(j * c, (j + 1) * c, tuple(i * c for i in keys),
                               tuple((j - i) / n_spans for i in keys), j / n_spans))
    return ScorePlan(length, tuple(spans), "sum")


def min_scorable_length(settings: CdsSettings) -> int:
    """Shortest document length with at least one probed query span."""
    c = settings.span
    if settings.variant == "code":
        return c * (1 + settings.sink_spans + 4 * settings.d_afs) + 1
    # first query span on the stride whose key list has the two values an unbiased std needs
    j = settings.first_span
    while j - settings.local_spans - 1 - settings.d_afs < settings.sink_spans:
        j += settings.d_cds
    return (j + 1) * c


def aggregate(pfs: Sequence[Sequence[float]], plan: ScorePlan) -> float:
    """A layer's CDS from the PFS values of each planned query span (float64)."""
    afs = []
    for values, span in zip(pfs, plan.spans):
        p = torch.as_tensor(values, dtype=torch.float64)
        w = torch.as_tensor(span.key_weights, dtype=torch.float64)
        spread = p.std(unbiased=True) if plan.std_weight else 1.0
        afs.append(float(spread * (p * w).sum() * span.weight))
    total = math.fsum(afs)
    return total / len(afs) if plan.reduce == "mean" else total


# --------------------------------------------------------------------------------------------
# The probe: exact probabilities for planned spans from post-RoPE q and k
# --------------------------------------------------------------------------------------------

def span_pfs(query: torch.Tensor, key: torch.Tensor, span: QuerySpan, width: int,
             scaling: float) -> torch.Tensor:
    """PFS of one query span for a batch of documents: [batch, len(span.key_starts)], fp32.

    query [B, H, L, D] and key [B, H_kv, L, D] as the attention layer receives them (post-RoPE,
    keys not repeated for GQA). One fused SDPA call does it: its value rows are indicators of the
    sampled key spans, so each output row is that query's probability mass on every sampled span,
    normalised over keys [0, span.key_end) (causal inside the query span when key_end > start).
    The kernel's online softmax is the blockwise log-sum-exp over the prefix; no probability
    matrix is stored.
    """
    b, _, _, dim = query.shape
    t, n_keys = span.start, len(span.key_starts)
    # SDPA's fused CPU/GPU kernels need value width == head width; zero-padding q and k to a
    # wider head leaves every score unchanged.
    value_dim = max(dim, n_keys)
    q = query[:, :, t:t + width].float()
    k = key[:, :, :span.key_end].float()
    if value_dim > dim:
        q = F.pad(q, (0, value_dim - dim))
        k = F.pad(k, (0, value_dim - dim))
    starts = torch.as_tensor(span.key_starts, device=query.device)
    rows = (starts[:, None] + torch.arange(width, device=query.device)[None, :]).reshape(-1)
    indicator = torch.zeros(span.key_end, value_dim, device=query.device)
    indicator[rows, torch.arange(n_keys, device=query.device).repeat_interleave(width)] = 1.0
    mask = causal_lower_right(width, span.key_end) if span.key_end > t else None
    mass = F.scaled_dot_product_attention(
        q, k, indicator.expand(b, key.shape[1], -1, -1), attn_mask=mask, scale=scaling,
        enable_gqa=True)
    return mass[..., :n_keys].sum(dim=2).mean(dim=1)  # sum over query rows, mean over heads


_ACTIVE_PROBE: contextvars.ContextVar = contextvars.ContextVar("ladm_probe", default=None)


def _probing_sdpa(module, query, key, value, attention_mask, **kwargs):
    probe = _ACTIVE_PROBE.get()
    if probe is not None:
        probe.observe(module.layer_idx, query, key, kwargs["scaling"])
    return _sdpa()(module, query, key, value, attention_mask, **kwargs)


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _register_probe_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_ATTENTION, _probing_sdpa)


@contextlib.contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Run ``model`` with another registered attention implementation, then restore it."""
    previous = model.config._attn_implementation
    if name == PROBE_ATTENTION:
        _register_probe_attention()
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


class _Probe:
    """Collects every layer's CDS for a batch under each settings; documents sharing a length
    share a plan and are probed together."""

    def __init__(self, lengths: Sequence[int], settings_list: Sequence[CdsSettings],
                 num_layers: int):
        self.layer_cds = [[[math.nan] * num_layers for _ in lengths] for _ in settings_list]
        self.jobs = []
        for which, settings in enumerate(settings_list):
            groups: dict = {}
            for row, length in enumerate(lengths):
                groups.setdefault(length, []).append(row)
            for length, rows in groups.items():
                plan = plan_spans(length, settings)
                if not plan.spans:
                    raise ValueError(f"a {length}-token document is too short to score "
                                     f"(minimum {min_scorable_length(settings)})")
                self.jobs.append((self.layer_cds[which], settings.span, plan, rows))

    @torch.no_grad()
    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        for layer_cds, width, plan, rows in self.jobs:
            index = torch.as_tensor(rows, device=query.device)
            q, k = query.index_select(0, index), key.index_select(0, index)
            per_span = [span_pfs(q, k, span, width, scaling).double().cpu()
                        for span in plan.spans]
            for n, row in enumerate(rows):
                layer_cds[row][layer] = aggregate([p[n].tolist() for p in per_span], plan)


def _decoder(model):
    """The bare decoder stack (no LM head: the score needs attention only)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


class CdsScorer:
    """Scores batches of token-id lists with one forward pass per batch.

    ``model`` is a Hugging Face causal LM or its bare decoder (``AutoModel``), already on its
    device and dtype.
    """

    name = "ladm-cds"

    def __init__(self, model, settings: CdsSettings):
        self.model = _decoder(model)
        self.settings = settings

    def min_length(self) -> int:
        return min_scorable_length(self.settings)

    def record(self) -> dict:
        return self.settings.record()

    def layer_scores(self, documents: Sequence[Sequence[int]]) -> List[List[float]]:
        """Per-layer CDS of each document (each must be at least ``min_length()`` long)."""
        return probe_layer_scores(self.model, documents, [self.settings])[0]

    def score(self, documents: Sequence[Sequence[int]], doc_keys: Optional[Sequence] = None
              ) -> List[dict]:
        """One result per document: ``score`` (= ``cds``, the layer mean) and ``layer_cds``."""
        results = []
        for layers in self.layer_scores(documents):
            cds = math.fsum(layers) / len(layers)
            results.append({"score": cds, "cds": cds, "layer_cds": layers})
        return results


@torch.no_grad()
def probe_layer_scores(model, documents: Sequence[Sequence[int]],
                       settings_list: Sequence[CdsSettings]) -> List[List[List[float]]]:
    """[settings][document][layer] CDS, every settings probed during one forward pass.

    Documents of different lengths are right-padded: causal attention keeps padding out of
    every real position, and each document is probed at its own length.
    """
    decoder = _decoder(model)
    probe = _Probe([len(ids) for ids in documents], settings_list,
                   decoder.config.num_hidden_layers)
    width = max(len(ids) for ids in documents)
    batch = torch.zeros(len(documents), width, dtype=torch.long)
    for row, ids in enumerate(documents):
        batch[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    token = _ACTIVE_PROBE.set(probe)
    try:
        with attention_implementation(decoder, PROBE_ATTENTION):
            decoder(input_ids=batch.to(next(decoder.parameters()).device), use_cache=False)
    finally:
        _ACTIVE_PROBE.reset(token)
    return probe.layer_cds
