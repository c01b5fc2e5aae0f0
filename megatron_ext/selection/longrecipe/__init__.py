"""LongRecipe's offline data tools (arXiv 2409.00509, §4.1): impactful-token analysis and selection.

- ``token_classes``: classify tokens by the word they belong to (numerals, punctuation, function
  words, capitalised words, other); spaCy part-of-speech tags when spaCy is installed.
- ``impactful_tokens``: logit change of the actual next token between a base and a
  context-extended model, top tokens per position, aggregated per class (``analyze``).
- ``sentence_selection``: split documents into sentences and keep impactful ones plus a random
  share of the rest, up to round(budget_ratio x T) tokens per T-token window (``select``).

Command line: ``tools/longrecipe_select.py {analyze,select}``. The position ids for the selected
samples are computed at training time (``--position-scheme longrecipe``), on the final tokens.
"""
