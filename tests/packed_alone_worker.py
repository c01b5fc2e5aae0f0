"""Run by tests/test_packed_documents.py in a fresh process: one rank, a tiny real model.

Per-token losses of three real documents packed into one sequence (document masks, positions
restarting per document) must equal those of each document run alone. With ``pose`` each
document's ids are drawn over [0, T) on their own, as the loader does for skip-wise schemes, and
the document alone gets the same ids.
"""

import json
import sys

import numpy as np
import torch

from megatron_ext import arguments, parallel
from megatron_ext.parallel.cp_layout import document_ids_from_eod
from megatron_ext.data import position_schemes
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.model import build_model, transformer_config
from megatron_ext.model.cp_attention import DocumentMaskParams


def per_token_loss(model, tokens, positions, labels, documents=None):
    params = None if documents is None else DocumentMaskParams.for_tokens(documents, tokens.shape[1])
    with torch.no_grad():
        return model(tokens, positions, None, labels=labels, packed_seq_params=params)[0]


TARGET = 2048  # T for skip-wise ids: four times the packed row


def document_positions(lengths, scheme: str):
    """Each document's ids on its own: 0..n-1, or PoSE ids over [0, TARGET)."""
    rng = np.random.default_rng(7)
    if scheme == "contiguous":
        return [np.arange(n) for n in lengths]
    return [position_schemes.pose(n, TARGET, rng, num_chunks=3) for n in lengths]


def main(tokenizer_model: str, texts_json: str, scheme: str = "contiguous") -> None:
    args = arguments.build_parser().parse_args([
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "512", "--device", "cpu",
        "--max-position-embeddings", str(TARGET)])
    # The model part only (no data flags), as arguments.finalize() derives it.
    model_config, layout = arguments.model_and_layout(args, world_size=1)
    model_config = model_config.with_vocab(32000)
    parallel.initialize(device="cpu")
    torch.manual_seed(0)
    from megatron.core import tensor_parallel
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(model_config, layout, transformer_config(model_config, layout, on_cpu=True),
                        True)
    model.eval()

    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    docs = [tokenizer.tokenize(t) + [tokenizer.eod] for t in json.loads(texts_json)]
    packed = torch.tensor([sum(docs, [])])
    labels = torch.roll(packed, -1, dims=1)
    document_ids = document_ids_from_eod(packed, tokenizer.eod)
    ids = document_positions([len(d) for d in docs], scheme)
    positions = torch.from_numpy(np.concatenate(ids)).unsqueeze(0)
    together = per_token_loss(model, packed, positions, labels, document_ids)

    start, worst = 0, 0.0
    for doc, doc_ids in zip(docs, ids):
        alone_tokens = torch.tensor([doc])
        alone_labels = labels[:, start:start + len(doc)]
        alone = per_token_loss(model, alone_tokens, torch.from_numpy(doc_ids).unsqueeze(0),
                               alone_labels)
        # The last token of a document predicts the next document: excluded by the loss mask.
        got, want = together[start:start + len(doc) - 1], alone[:len(doc) - 1]
        worst = max(worst, ((got - want).abs() / want.abs()).max().item())
        start += len(doc)
    print(json.dumps({"documents": [len(d) for d in docs], "max_rel_diff": worst,
                      "largest_id": int(positions.max())}))
    parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:4])
