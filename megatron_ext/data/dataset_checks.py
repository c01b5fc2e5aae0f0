"""Does a ``--data-path`` prefix fit this run? Checked with the flags, before any work.

* A prefix must name the tokens, not the ``_tokenflags`` sidecar preprocessing writes beside them.
* A dataset whose ``_meta.json`` records its tokenizer must be read with that tokenizer: the same
  --tokenizer-type, and a --tokenizer-model that is the recorded one (the same path, or files with
  the same bytes: a copy). A recorded model that no longer exists on this machine cannot be
  compared and is accepted.
"""

from __future__ import annotations

import filecmp
import os

from megatron_ext.data import token_flags
from megatron_ext.errors import ArgumentError

SIDECAR = token_flags.flags_prefix("")  # "_tokenflags"


def check_prefix(prefix: str, tokenizer_type: str, tokenizer_model: str) -> None:
    if prefix.endswith(SIDECAR):
        raise ArgumentError(
            f"--data-path {prefix} names the token-flags sidecar written beside a dataset; give "
            f"the dataset's own prefix: --data-path {prefix[:-len(SIDECAR)]}")
    meta = token_flags.read_meta(prefix) or {}
    recorded_type, recorded_model = meta.get("tokenizer_type"), meta.get("tokenizer_model")
    if recorded_type and recorded_type != tokenizer_type:
        raise ArgumentError(
            f"--tokenizer-type {tokenizer_type} disagrees with {token_flags.meta_path(prefix)}, "
            f"which records {recorded_type} ({recorded_model}); train with the tokenizer the data "
            "was preprocessed with, or preprocess it again")
    if recorded_model and not same_tokenizer(recorded_model, tokenizer_model):
        raise ArgumentError(
            f"--tokenizer-model {tokenizer_model} is not the tokenizer "
            f"{token_flags.meta_path(prefix)} records ({recorded_model}); train with that "
            "tokenizer, or preprocess the data again with this one")


def same_tokenizer(recorded: str, given: str) -> bool:
    if not os.path.exists(recorded):
        return True  # moved from another machine: nothing to compare against
    if os.path.realpath(recorded) == os.path.realpath(given):
        return True
    if os.path.isfile(recorded) and os.path.isfile(given):
        return filecmp.cmp(recorded, given, shallow=False)
    if os.path.isdir(recorded) and os.path.isdir(given):
        files = sorted(name for name in os.listdir(recorded) if name.startswith(("tokenizer",
                       "vocab", "merges", "special_tokens")))
        match, mismatch, errors = filecmp.cmpfiles(recorded, given, files, shallow=False)
        return bool(files) and not mismatch and not errors
    return False
