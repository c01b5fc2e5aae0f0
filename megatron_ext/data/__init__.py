"""Datasets, tokenizers, position schemes and batching: tokens on disk -> samples -> per-rank batches."""
