"""What the loader feeds the model, as plain JSON: for users checking their data pipeline.

Uses the training flags and the training code path (``datasets_for`` and the global sample
order of ``MicroBatchIterator``), so a record shows exactly the tokens, labels, loss mask, position
ids and document ids a training step would see, plus where recorded segments and documents start.

Preference data (``tools/preprocess_preference.py``) is dumped per branch - the chosen answer and
each rejected one - as separate sequences: input ids, labels (-100 on the prompt; Hugging Face
style, aligned with the input ids) and position ids, i.e. what a TRL-style trainer would feed for
the same row. The packed sequence the model really sees (shared-prefix or separate) follows under
``"packed"``.
"""

from __future__ import annotations

import json
from typing import Dict, Iterator, Optional

import numpy as np

from megatron_ext.config import RunConfig
from megatron_ext.data import token_flags
from megatron_ext.parallel.cp_layout import cp_token_indices
from megatron_ext.data.gpt_data import BatchLayout, MicroBatchIterator
from megatron_ext.objectives import datasets_for
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.errors import UserError

SPLITS = ("train", "valid", "test")


def sample_records(cfg: RunConfig, num_samples: int, split: str = "train", decode: bool = False
                   ) -> Iterator[Dict]:
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    sizes = [num_samples if name == split else 0 for name in SPLITS]
    dataset = datasets_for(cfg, tokenizer, sizes)[SPLITS.index(split)]
    if dataset is None:
        raise UserError(f"--split {cfg.data.split} leaves the {split} split without documents")
    cp = cfg.layout.cp
    if cfg.objective.name == "preference":
        yield from _preference_records(dataset, num_samples, cfg.objective.options, cp,
                                       tokenizer if decode else None)
        return
    # One rank holding the whole global batch: the global order every layout shares.
    batches = MicroBatchIterator(dataset, BatchLayout(1, 1, 0, 1))
    for index in range(num_samples):
        batch = {key: value[0] for key, value in next(batches).items()}
        yield _record(index, batch, _flags_of(dataset, index), cp, tokenizer if decode else None)


def _preference_records(dataset, num_samples: int, options, cp: int, tokenizer
                        ) -> Iterator[Dict]:
    names = ["chosen"] + [f"rejected_{j}" for j in range(1, options.num_rejected + 1)]
    for index in range(num_samples):
        record = {"index": index, "row": dataset.row_of(index)}
        if hasattr(dataset, "dataset_of"):  # a weighted blend: which dataset the row is from
            record["dataset"] = dataset.dataset_of(index)
        branches = dataset.branches(index)
        for name, branch in zip(names, branches, strict=True):
            entry = {key: value.tolist() for key, value in branch.items()}
            if tokenizer is not None:
                answer = branch["input_ids"][branch["labels"] != -100]
                entry["answer_text"] = tokenizer.detokenize(answer.tolist())
            record[name] = entry
        if tokenizer is not None:
            prompt = branches[0]["input_ids"][branches[0]["labels"] == -100]
            record["prompt_text"] = tokenizer.detokenize(prompt.tolist())
        record["packed"] = {"layout": options.preference_packing,
                            **_record(index, dataset[index], None, cp, None)}
        yield record


def _flags_of(dataset, index: int) -> Optional[np.ndarray]:
    # A blend maps the global index to (dataset, sample); flags live on the GPT dataset.
    if hasattr(dataset, "dataset_index"):
        part = dataset.datasets[dataset.dataset_index[index]]
        return part.sample_flags(int(dataset.dataset_sample_index[index]))
    return dataset.sample_flags(index)


def _record(index: int, batch: Dict, flags: Optional[np.ndarray], cp: int, tokenizer) -> Dict:
    record = {"index": index}
    for key, value in batch.items():
        record[key] = value.tolist()
    if flags is not None:
        inputs = flags[:-1]
        # A start is the token after an end (the sample's first token always starts something).
        record["segment_starts"] = [0] + (np.flatnonzero(inputs[:-1] & token_flags.SEGMENT_END)
                                          + 1).tolist()
        record["document_starts"] = [0] + (np.flatnonzero(inputs[:-1] & token_flags.DOCUMENT_END)
                                           + 1).tolist()
    if cp > 1:
        record["cp_rank_token_indices"] = [
            cp_token_indices(len(batch["tokens"]), cp, rank).tolist() for rank in range(cp)]
    if tokenizer is not None:
        record["text"] = tokenizer.detokenize(batch["tokens"].tolist())
    return record


def write_records(records: Iterator[Dict], path: str) -> int:
    count = 0
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    return count
