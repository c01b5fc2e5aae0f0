"""Checkpoints: save and load (``checkpointing.py``, Megatron-Core dist_checkpointing, atomic),
conversion to and from Hugging Face folders (``convert/``), and weight merging (``merge.py``)."""
