"""Token classes for impactful-token analysis and selection.

A model token is classified by the *word* it belongs to, not by its own sub-word text (" Wood" and
"house" are both part of the capitalised word "Woodhouse"; the four digit tokens of "1815" are all
numerals). Words come from a small regex segmentation of the text; tokens are mapped to words
through their character offsets. Classes, first match wins:

  numerals        the word has a digit, or is an English cardinal number word ("twenty", "one")
  punctuation     no letter or digit at all (punctuation and symbols)
  function_words  a fixed English list: articles, pronouns, prepositions, conjunctions,
                  auxiliaries and modals, negation (case-insensitive, so "The" is here)
  capitalised     starts with an upper-case letter (names, sentence starts)
  other           everything else (content words in lower case)
  whitespace      tokens with no visible character (newlines, indentation)
  special         tokens with no text span (BOS/EOS added by the tokenizer)

These are heuristics for English. Part-of-speech tags (the paper's NUM, PRON, AUX, ...) come from
spaCy when it and a pipeline are installed (``pos_tagger``); nothing here needs it.
"""

from __future__ import annotations

import bisect
import re
from typing import Callable, List, Optional, Sequence, Tuple

NUMERALS, PUNCTUATION, FUNCTION_WORDS, CAPITALISED, OTHER = (
    "numerals", "punctuation", "function_words", "capitalised", "other")
WHITESPACE, SPECIAL = "whitespace", "special"
# Classes a word can have (what --keep-classes accepts), then the token-only ones.
WORD_CLASSES = (NUMERALS, PUNCTUATION, FUNCTION_WORDS, CAPITALISED, OTHER)
TOKEN_CLASSES = WORD_CLASSES + (WHITESPACE, SPECIAL)

NUMBER_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred
thousand million billion trillion dozen
""".split())

FUNCTION_WORD_LIST = frozenset("""
a an the this that these those each every either neither some any no all both few many much
more most several such what which whose whatever whichever
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
it its itself we us our ours ourselves they them their theirs themselves who whom whoever
oneself something anything nothing everything someone anyone everyone somebody anybody nobody
about above across after against along amid among around at before behind below beneath beside
besides between beyond by despite down during except for from in inside into like near of off
on onto out outside over past per since through throughout till to toward towards under
underneath until unto up upon via with within without
and but or nor so yet although though because if unless whereas while whilst whether than as
once lest
am is are was were be been being have has had having do does did doing will would shall should
can could may might must ought
not there here then when where why how very too also just only
i'm you're he's she's it's we're they're i've you've we've they've i'd you'd he'd she'd we'd
they'd i'll you'll he'll she'll we'll they'll isn't aren't wasn't weren't hasn't haven't hadn't
doesn't don't didn't won't wouldn't shan't shouldn't can't cannot couldn't mustn't that's there's
""".split())

# Numbers with separators (1,000  3.14  12:30), then runs of word characters (with inner
# apostrophes: "don't", "Emma's"), then any other single visible character.
_WORDS = re.compile(r"\d+(?:[.,:]\d+)+|\w+(?:['’]\w+)*|\S")


def classify_word(word: str) -> str:
    if any(c.isdigit() for c in word):
        return NUMERALS
    if not any(c.isalnum() for c in word):
        return PUNCTUATION
    lower = word.lower().replace("’", "'")
    if lower in NUMBER_WORDS:
        return NUMERALS
    if lower in FUNCTION_WORD_LIST:
        return FUNCTION_WORDS
    if word[0].isupper():
        return CAPITALISED
    return OTHER


def word_spans(text: str) -> List[Tuple[int, int]]:
    return [m.span() for m in _WORDS.finditer(text)]


def classes_in(text: str) -> set:
    """The word classes present in ``text`` (for sentence selection)."""
    return {classify_word(m.group()) for m in _WORDS.finditer(text)}


def _first_visible(text: str, start: int, end: int) -> Optional[int]:
    for i in range(start, end):
        if not text[i].isspace():
            return i
    return None


def _label_tokens(text: str, offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]],
                  labels: Sequence[str]) -> List[str]:
    """Each token gets the label of the span holding its first visible character."""
    starts = [s for s, _ in spans]
    out = []
    for start, end in offsets:
        if start == end:
            out.append(SPECIAL)
            continue
        first = _first_visible(text, start, end)
        if first is None:
            out.append(WHITESPACE)
            continue
        k = bisect.bisect_right(starts, first) - 1
        out.append(labels[k] if k >= 0 and first < spans[k][1] else PUNCTUATION)
    return out


def token_classes(text: str, offsets: Sequence[Tuple[int, int]]) -> List[str]:
    """One class per token, given each token's (start, end) character offsets in ``text``."""
    spans = word_spans(text)
    return _label_tokens(text, offsets, spans, [classify_word(text[s:e]) for s, e in spans])


PosTagger = Callable[[str, Sequence[Tuple[int, int]]], List[str]]


def pos_tagger(model: str = "en_core_web_sm") -> Tuple[Optional[PosTagger], str]:
    """(tagger, description) when spaCy and ``model`` load, else (None, why not)."""
    try:
        import spacy
    except ImportError:
        return None, (f"spaCy is not installed, so no part-of-speech table (pip install spacy && "
                      f"python -m spacy download {model})")
    try:
        nlp = spacy.load(model, disable=["parser", "ner", "lemmatizer"])
    except OSError as err:
        return None, f"spaCy pipeline {model!r} is not installed ({err})"

    def tag(text: str, offsets: Sequence[Tuple[int, int]]) -> List[str]:
        nlp.max_length = max(nlp.max_length, len(text) + 1)
        doc = nlp(text)
        spans = [(t.idx, t.idx + len(t.text)) for t in doc]
        return _label_tokens(text, offsets, spans, [t.pos_ for t in doc])

    return tag, f"spaCy {spacy.__version__} {model}"
