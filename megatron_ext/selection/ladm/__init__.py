"""LADM long-context data selection (arXiv 2503.02502).

``scoring`` - exact blockwise contextual dependency scores (``code`` and ``paper`` variants);
``reference`` - the same from full eager attention matrices (tests, benchmarks);
``delta_ppl`` - ProLong's delta-perplexity score behind the same interface;
``scores_io`` / ``pipeline`` - JSON-lines input, sharding, append-only output with resume;
``selection`` - per-domain percentile or global top-k under a token budget, plus a summary;
``loading`` - model, tokenizer and scorer construction. Command line: ``tools/ladm_select.py``.
"""
