"""ProLong long-dependency score (LDS): delta perplexity with and without an earlier segment.

Chen et al. 2024 (ACL), released ``October2001/ProLong`` ``prolong/run.py``. A document's
scored prefix is cut into ``span``-token segments (the last partial one dropped). For segment i
alone and for sampled pairs (i, j), j < i, with segment j prepended, the perplexity of segment
i's tokens 1..span-1 gives DS(i, j) = (PPL(i) - PPL(i | j)) / PPL(i);
DD(i, j) = clip((i - j) / (chunk_num - 1), 0, 1) with chunk_num = seq_length // span;
DSp(i) = clip((log n - H) / log n, 0, 1), H the entropy of the
softmax of i's raw deltas PPL(i) - PPL(i | j) over its n sampled j (1 when n = 1);
LDS = sum over sampled pairs with DS > threshold of (DS + DD) * DSp(i).

Deliberate differences from the released code, so that scores are comparable with LADM's:
only the scored prefix (first ``seq_length`` tokens, the same ids LADM sees) is used, so no segment
subsampling is needed; when a document has fewer pairs than ``pairs``, all pairs are used (the
released code then computes nothing and scores 0, its issue #1); pair sampling is seeded per
document (seed and document id), so shards and resumed runs reproduce the same pairs.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProlongSettings:
    span: int = 128
    seq_length: int = 32768
    pairs: int = 500
    threshold: float = 0.1
    seed: int = 11

    def __post_init__(self):
        # messages name the command-line flags (--prolong-pairs sets ``pairs``)
        if self.span < 2:
            raise ValueError(f"--span must be >= 2 for delta perplexity, got {self.span}")
        if self.seq_length < 2 * self.span:
            raise ValueError(f"--seq-length ({self.seq_length}) must hold two spans of --span "
                             f"{self.span}")
        if self.pairs < 1:
            raise ValueError(f"--prolong-pairs must be >= 1, got {self.pairs}")

    def record(self) -> dict:
        """The settings as written into every score row."""
        return {"scorer": ProlongScorer.name, **asdict(self)}

    @property
    def chunk_num(self) -> int:
        return self.seq_length // self.span


def sample_pairs(num_segments: int, count: int, rng: random.Random) -> List[Tuple[int, int]]:
    """``count`` distinct (i, j) pairs with j < i, or all of them when there are fewer."""
    total = num_segments * (num_segments - 1) // 2
    chosen = range(total) if total <= count else sorted(rng.sample(range(total), count))
    pairs = []
    for flat in chosen:  # flat index over rows i = 1.., each with i pairs
        i = int((1 + math.isqrt(1 + 8 * flat)) // 2)
        while i * (i - 1) // 2 > flat:
            i -= 1
        pairs.append((i, flat - i * (i - 1) // 2))
    return pairs


def _specificity(deltas: Sequence[float]) -> float:
    if len(deltas) == 1:
        return 1.0
    probs = torch.softmax(torch.tensor(deltas, dtype=torch.float64), dim=0)
    probs = probs.clamp_min(1e-300)
    entropy = float(-(probs * probs.log()).sum())
    return min(1.0, max(0.0, (math.log(len(deltas)) - entropy) / math.log(len(deltas))))


def lds_from_perplexities(alone: Sequence[float], pairs: Sequence[Tuple[int, int]],
                          conditioned: Sequence[float], chunk_num: int, threshold: float) -> float:
    """LDS from segment perplexities alone and for each sampled (i, j) pair."""
    deltas: dict = {}
    for (i, _), ppl in zip(pairs, conditioned):
        deltas.setdefault(i, []).append(alone[i] - ppl)
    specificity = {i: _specificity(d) for i, d in deltas.items()}
    lds = 0.0
    for (i, j), ppl in zip(pairs, conditioned):
        ds = (alone[i] - ppl) / alone[i]
        if ds > threshold:
            lds += (ds + min(1.0, max(0.0, (i - j) / (chunk_num - 1)))) * specificity[i]
    return 0.0 if math.isnan(lds) else lds


class ProlongScorer:
    """ProLong LDS with a Hugging Face causal LM (needs its LM head)."""

    name = "prolong-delta-ppl"

    def __init__(self, model, settings: ProlongSettings, sequences_per_forward: int = 8):
        self.model = model
        self.settings = settings
        self.sequences_per_forward = sequences_per_forward

    def min_length(self) -> int:
        return 2 * self.settings.span

    def record(self) -> dict:
        return self.settings.record()

    @torch.no_grad()
    def _perplexities(self, sequences: torch.Tensor, scored_from: int) -> List[float]:
        """exp(mean NLL) of tokens scored_from+1 .. end of each row of ``sequences``."""
        device = next(self.model.parameters()).device
        keep = sequences.shape[1] - scored_from  # logits of the last `keep` positions
        out = []
        for lo in range(0, sequences.shape[0], self.sequences_per_forward):
            batch = sequences[lo:lo + self.sequences_per_forward].to(device)
            logits = self.model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
            logits = logits[:, :-1].float()  # the last position predicts past the sequence
            targets = batch[:, scored_from + 1:]
            # the flat [tokens, vocab] path: the [batch, vocab, tokens] one loses ~1e-4 in fp32
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  reduction="none").view(targets.shape)
            out.extend(torch.exp(nll.double().mean(dim=1)).tolist())
        return out

    def score_one(self, ids: Sequence[int], doc_key: str) -> float:
        span = self.settings.span
        n = len(ids) // span
        segments = torch.as_tensor(list(ids[:n * span]), dtype=torch.long).view(n, span)
        pairs = sample_pairs(n, self.settings.pairs,
                             random.Random(f"{self.settings.seed}:{doc_key}"))
        alone = self._perplexities(segments, 0)
        joined = torch.stack([torch.cat([segments[j], segments[i]]) for i, j in pairs])
        conditioned = self._perplexities(joined, span)
        return lds_from_perplexities(alone, pairs, conditioned, self.settings.chunk_num,
                                     self.settings.threshold)

    def score(self, documents: Sequence[Sequence[int]],
              doc_keys: Optional[Sequence[str]] = None) -> List[dict]:
        keys = doc_keys if doc_keys is not None else [str(n) for n in range(len(documents))]
        return [{"score": self.score_one(ids, key)} for ids, key in zip(documents, keys)]
