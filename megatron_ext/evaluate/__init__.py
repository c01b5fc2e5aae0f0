"""Long-context evaluation on Megatron checkpoints and in-memory models.

  corpus.py           --eval-data (jsonl or indexed dataset) as token arrays
  haystack.py         passkey / NIAH (single, multi-key) prompts of exact token length
  model_runner.py     forward passes under any TP/PP/CP/DP layout: per-token losses, greedy answers
  ppl_by_position.py  loss per position bucket on held-out documents
  tasks.py            the tasks and their scoring
  results.py, plots.py  results.json, PNG charts, one-screen summary
  cli.py              ``python -m megatron_ext.evaluate``
  training_hook.py    the same tasks at --eval-interval during training
"""
