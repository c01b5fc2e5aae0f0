"""Tokenizers behind Megatron-Core's tokenizer interface (what GPTDataset reads: eod, pad, vocab_size).

Two kinds, named as in Megatron-LM's ``--tokenizer-type``:
  SentencePieceTokenizer  a ``.model`` file (Llama / Mistral style), tokenized with sentencepiece
                          itself for byte-exact Llama behaviour.
  HuggingFaceTokenizer    a folder or ``tokenizer.json`` loadable by transformers.AutoTokenizer.
"""

from __future__ import annotations

import math
import os
from typing import List

import numpy as np
from megatron.core.tokenizers.base_tokenizer import MegatronTokenizerBase

from megatron_ext.errors import UserError


class SentencePieceTokenizer(MegatronTokenizerBase):
    def __init__(self, model_file: str):
        import sentencepiece

        super().__init__(model_file, {"library": "sentencepiece"})
        # Megatron's dataset index cache is keyed by these.
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [model_file]}
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.bos = self._sp.bos_id()
        self.eod = self._sp.eos_id()
        # Llama-style models have no pad piece; -1 never matches a token id.
        self.pad = self._sp.pad_id()

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self):
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("a bare SentencePiece model carries no chat template")


class HuggingFaceTokenizer(MegatronTokenizerBase):
    def __init__(self, path: str):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        super().__init__(path, {"library": "huggingface"})
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [path]}
        if os.path.isfile(path) and path.endswith(".json"):
            self._tok = PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            self._tok = AutoTokenizer.from_pretrained(path)
        self.bos = self._tok.bos_token_id
        self.eod = self._tok.eos_token_id
        if self.eod is None:
            raise UserError(f"--tokenizer-model {path}: the tokenizer defines no eos token, "
                             "which Megatron uses as end-of-document")
        self.pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else -1

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab(self):
        return self._tok.get_vocab()

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def apply_chat_template(self, conversation, **kwargs):
        return self._tok.apply_chat_template(conversation, **kwargs)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> MegatronTokenizerBase:
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise UserError(f"--tokenizer-type {tokenizer_type!r} is not supported: use "
                     "SentencePieceTokenizer or HuggingFaceTokenizer")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Pad the embedding table so every TP rank holds an equal slice.

    Megatron-LM pads to divisible_by x TP, which makes the table's shape depend on the layout; we
    pad to lcm(divisible_by, TP) so a checkpoint keeps its shape when TP changes (for any TP that
    divides divisible_by, the usual powers of two).
    """
    multiple = math.lcm(divisible_by, tensor_parallel_size)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32
