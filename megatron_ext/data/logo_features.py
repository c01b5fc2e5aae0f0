"""LOGO importance scoring: which context chunks matter for a question.

A chunk's score is the number of features it shares with the question (and, when asked, with the
gold answer, as LOGO does):

    score(chunk) = |(F(question) [u F(answer)]) n F(chunk)|

Two feature extractors, F(text) a set of strings:

``spacy``    LOGO's: lemmas of the VERB and NOUN tokens plus the named-entity strings of a spaCy
             pipeline (``en_core_web_lg`` by default, any installed model by name), lowercased.
``lexical``  the fallback when spaCy or its model is not installed: lowercased word tokens
             (letters and digits, inner apostrophes kept, ``'s`` dropped), minus ``STOP_WORDS``
             and tokens shorter than 2 characters, each reduced by ``stem`` (a few English suffix
             rules: plurals, -ing, -ed, a final silent e), so "walked" / "walking" / "walks" meet.

``select_chunks`` ranks chunks by score (ties: earlier chunk first), keeps the top K and returns
the three evidence sets LOGO generates answers from, each in document order: all K kept chunks,
the top K/2 and the bottom K/2 of the kept chunks.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, FrozenSet, List, Optional, Sequence

from megatron_ext.errors import UserError

FeatureFn = Callable[[str], FrozenSet[str]]

DEFAULT_SPACY_MODEL = "en_core_web_lg"

# Function words and very common verbs; they say nothing about which chunk holds the answer.
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing done down during each either else ever
every few for from further get got had has have having he her here hers herself him himself his
how however i if in into is it its itself just let like made make many may me might more most
much must my myself neither no nor not now of off on once one only or other ought our ours
ourselves out over own per quite rather said same say says shall she should since so some such
than that the their theirs them themselves then there these they this those though through thus
to too under until up upon us very was we were what whatever when where whether which while who
whom whose why will with within without would yet you your yours yourself yourselves
""".split())

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


def stem(word: str) -> str:
    """A light suffix stripper (not Porter): enough to make inflected forms of one word meet.

    Plural and verb endings go, then a final silent "e" ("loves", "loved", "love" -> "lov")."""
    word = _strip_suffix(word)
    return word[:-1] if len(word) > 3 and word.endswith("e") and not word.endswith("ee") else word


def _strip_suffix(word: str) -> str:
    for suffix, replacement, keep in (("ies", "y", 3), ("sses", "ss", 2), ("ing", "", 3),
                                      ("ed", "", 3), ("es", "", 3), ("s", "", 3)):
        if word.endswith(suffix) and len(word) - len(suffix) >= keep:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            if suffix == "ed" and word.endswith("eed"):
                return word[:-1]  # "agreed" -> "agree"
            if suffix == "es" and not word.endswith(("ches", "shes", "xes", "zes", "sses")):
                continue  # "places" -> "place" (by the "s" rule), "boxes" -> "box"
            word = word[:len(word) - len(suffix)] + replacement
            if suffix in ("ing", "ed") and len(word) > 3 and word[-1] == word[-2] \
                    and word[-1] not in "lsz":
                word = word[:-1]  # "stopped" -> "stopp" -> "stop"
            return word
    return word


def lexical_features(text: str) -> FrozenSet[str]:
    words = (w[:-2] if w.endswith("'s") else w for w in _WORD.findall(text.lower()))
    return frozenset(stem(w) for w in words if len(w) >= 2 and w not in STOP_WORDS)


class SpacyFeatures:
    """LOGO's features: VERB and NOUN lemmas and entity strings of a spaCy pipeline."""

    def __init__(self, model: str = DEFAULT_SPACY_MODEL):
        try:
            import spacy
        except ImportError:
            raise UserError("--features spacy: spaCy is not installed (pip install spacy, then "
                            f"python -m spacy download {model}); or use --features lexical"
                            ) from None
        try:
            self.nlp = spacy.load(model, disable=["parser"])
        except OSError:
            raise UserError(f"--spacy-model {model}: no such spaCy model installed (python -m "
                            f"spacy download {model}); or use --features lexical") from None
        self.nlp.max_length = max(self.nlp.max_length, 10_000_000)  # book-length chunks

    def __call__(self, text: str) -> FrozenSet[str]:
        doc = self.nlp(text)
        lemmas = {t.lemma_.lower() for t in doc if t.pos_ in ("VERB", "NOUN")}
        return frozenset(lemmas | {e.text.lower() for e in doc.ents})


def build_extractor(kind: str, spacy_model: str = DEFAULT_SPACY_MODEL):
    """(name recorded in the summary, feature function) for ``--features auto|spacy|lexical``.

    ``auto`` takes spaCy when it and the model are installed, the lexical fallback otherwise."""
    if kind not in ("auto", "spacy", "lexical"):
        raise UserError(f"--features must be auto, spacy or lexical, got {kind!r}")
    if kind != "lexical":
        try:
            return f"spacy:{spacy_model}", SpacyFeatures(spacy_model)
        except UserError:
            if kind == "spacy":
                raise
    return "lexical", lexical_features


@dataclasses.dataclass(frozen=True)
class ChunkSelection:
    scores: List[int]           # one per chunk of the document
    ranked: List[int]           # chunk indices, best first (ties: document order)
    kept: List[int]             # the top K, in document order
    top_half: List[int]         # the K//2 best kept chunks, in document order
    bottom_half: List[int]      # the K//2 worst kept chunks, in document order

    @property
    def best(self) -> int:
        return max(self.scores[i] for i in self.kept)

    @property
    def worst_kept(self) -> int:
        return min(self.scores[i] for i in self.kept)


def select_chunks(chunks: Sequence[str], query_features: FrozenSet[str], features: FeatureFn,
                  num_chunks: int, usable: Optional[Sequence[bool]] = None
                  ) -> Optional[ChunkSelection]:
    """Score ``chunks`` against ``query_features`` and keep the top ``num_chunks`` (K).

    ``usable[i]`` False leaves chunk i out of the ranking (e.g. whitespace only). None when fewer
    than K chunks can be ranked."""
    if num_chunks < 2:
        raise UserError(f"--num-chunks must be at least 2 (a top and a bottom half), got "
                        f"{num_chunks}")
    scores = [len(query_features & features(chunk)) for chunk in chunks]
    candidates = [i for i in range(len(chunks)) if usable is None or usable[i]]
    if len(candidates) < num_chunks:
        return None
    ranked = sorted(candidates, key=lambda i: (-scores[i], i))
    kept = ranked[:num_chunks]
    half = num_chunks // 2
    return ChunkSelection(scores, ranked, sorted(kept), sorted(kept[:half]),
                          sorted(kept[num_chunks - half:]))
