"""Preference samples: one prompt, a chosen answer and M rejected answers -> one training row.

Preference data comes from ``tools/preprocess_preference.py``: each row is one document of the
indexed dataset whose sequences are ``[prompt, chosen, rejected_1 .. rejected_M]``; its flags mark
where the prompt's segments end (head, context chunks, question). A row becomes one sample of
``--seq-length`` tokens holding all 1 + M branches, in one of two layouts:

  separate        branch k = prompt + answer_k, the branches one after another, each its own
                  document (document masking), exactly what 1 + M separate sequences compute.
  shared-prefix   the prompt (but its last token) once, then per branch [last prompt token,
                  answer_k]. A branch attends to the shared prompt and to itself only
                  (``branch_ids``), and its position ids continue from the prompt's for every
                  branch, so each answer sees what it would see in ``separate``. The last prompt
                  token is repeated per branch because it predicts a different first answer token
                  in each. The context is encoded once instead of 1 + M times.

Per token the sample holds: tokens, labels (next token, -100 where nothing is scored), loss_mask,
position_ids, document_ids, branch_ids and ``score_branch`` (which answer the label at this position
belongs to: 0 = chosen, 1..M = rejected, -1 = none). Position ids are contiguous, or LOGO's
synthesis (``position_schemes.logo``) drawn from the (seed, dataset, sample index) generator.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data import position_schemes, token_flags
from megatron_ext.errors import UserError

LAYOUTS = ("separate", "shared-prefix")
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    seq_length: int
    num_rejected: int
    layout: str = "separate"
    position_scheme: str = "contiguous"
    target_seq_length: Optional[int] = None
    seed: int = 1234
    pad_token: int = 0


@dataclasses.dataclass
class PreferenceRow:
    """One row as preprocessed: prompt ids, its segment lengths, chosen and rejected answers."""

    prompt: np.ndarray
    segment_lengths: np.ndarray
    answers: List[np.ndarray]  # [chosen, rejected_1 .. rejected_M]


class PreferenceRows:
    """Random access to the rows of one preprocessed preference dataset."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.meta = token_flags.read_meta(prefix) or {}
        if self.meta.get("kind") != "preference":
            raise ValueError(f"{prefix} is not preference data (its _meta.json kind is "
                             f"{self.meta.get('kind')!r}); write it with tools/preprocess_preference.py")
        if not token_flags.has_flags(prefix):
            raise ValueError(f"{prefix} has no {token_flags.flags_prefix(prefix)}.bin/.idx; re-run "
                             "tools/preprocess_preference.py")
        self.tokens = IndexedDataset(prefix)
        self.flags = IndexedDataset(token_flags.flags_prefix(prefix))
        self.sequence_bounds = np.asarray(self.tokens.document_indices, dtype=np.int64)
        self.sequence_lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sequence_bounds) - 1

    def fingerprint(self) -> str:
        """Identifies the dataset's content (its index file and token count): a file of
        per-row values computed from another dataset is refused by comparing this."""
        import hashlib

        with open(self.prefix + ".idx", "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return f"{digest[:32]}:{int(self.sequence_lengths.sum())}"

    def answers_per_row(self) -> np.ndarray:
        return np.diff(self.sequence_bounds) - 1

    def lengths(self, row: int, num_rejected: int):
        """(prompt length, answer lengths [chosen, rejected_1 .. rejected_M])."""
        first = self.sequence_bounds[row]
        lengths = self.sequence_lengths[first:first + 2 + num_rejected]
        return int(lengths[0]), lengths[1:]

    def row(self, index: int, num_rejected: int) -> PreferenceRow:
        first = int(self.sequence_bounds[index])
        available = int(self.sequence_bounds[index + 1]) - first - 1
        if available < num_rejected + 1:
            raise UserError(f"row {index} of {self.prefix} has {available - 1} rejected answers, "
                             f"fewer than --num-rejected {num_rejected}")
        prompt = np.array(self.tokens[first], dtype=np.int64)
        ends = np.flatnonzero(np.array(self.flags[first]) & token_flags.SEGMENT_END) + 1
        if len(ends) == 0 or ends[-1] != len(prompt):
            ends = np.append(ends, len(prompt))
        segments = np.diff(np.concatenate(([0], ends)))
        answers = [np.array(self.tokens[first + 1 + k], dtype=np.int64)
                   for k in range(num_rejected + 1)]
        return PreferenceRow(prompt, segments, answers)


# ------------------------------------------------------------------------------------------------
# Branches and layouts (pure functions of a row and its prompt positions)
# ------------------------------------------------------------------------------------------------

def prompt_positions(row: PreferenceRow, scheme: str, target_length: Optional[int],
                     rng: Optional[np.random.Generator]) -> np.ndarray:
    if scheme == "contiguous":
        return position_schemes.contiguous(len(row.prompt))
    if scheme == "logo":
        longest = max(len(a) for a in row.answers)
        return position_schemes.logo(row.segment_lengths, longest, target_length, rng)
    raise UserError(f"--position-scheme {scheme!r} does not apply to preference data: use "
                     "contiguous or logo")


def branches(row: PreferenceRow, positions: np.ndarray) -> List[Dict[str, np.ndarray]]:
    """Each branch as a separate sequence, Hugging Face style: input_ids, labels (= input ids on
    answer tokens, -100 on the prompt; the model predicts labels[t] from tokens before t) and
    position_ids (the answer continues from the last prompt id)."""
    out = []
    for answer in row.answers:
        out.append({
            "input_ids": np.concatenate([row.prompt, answer]),
            "labels": np.concatenate([np.full(len(row.prompt), IGNORE), answer]),
            "position_ids": np.concatenate([positions, positions[-1] + 1 + np.arange(len(answer))]),
        })
    return out


def layout_length(prompt_length: int, answer_lengths: Sequence[int], layout: str) -> int:
    answers = int(np.sum(answer_lengths))
    if layout == "separate":
        return len(answer_lengths) * prompt_length + answers
    return prompt_length - 1 + len(answer_lengths) + answers


class _Row:
    """Accumulates pieces of a packed row."""

    def __init__(self):
        self.pieces: Dict[str, List[np.ndarray]] = {k: [] for k in (
            "tokens", "labels", "position_ids", "document_ids", "branch_ids", "score_branch")}

    def add(self, tokens, labels, positions, document, branch, score_branch):
        n = len(tokens)
        for key, value in (("tokens", tokens), ("labels", labels), ("position_ids", positions),
                           ("document_ids", np.full(n, document)), ("branch_ids", np.full(n, branch)),
                           ("score_branch", score_branch)):
            self.pieces[key].append(np.asarray(value, dtype=np.int64))

    def finish(self, seq_length: int, pad_token: int, pad_document: int) -> Dict[str, np.ndarray]:
        used = sum(len(t) for t in self.pieces["tokens"])
        pad = seq_length - used
        if pad < 0:
            raise UserError(f"row needs {used} tokens, more than --seq-length {seq_length}")
        if pad:
            # Padding is its own document: it attends only to itself and is never scored.
            self.add(np.full(pad, pad_token), np.full(pad, IGNORE), np.arange(pad), pad_document,
                     0, np.full(pad, -1))
        sample = {k: np.concatenate(v) for k, v in self.pieces.items()}
        sample["loss_mask"] = (sample["labels"] != IGNORE).astype(np.float32)
        return sample


def _next_token_labels(tokens: np.ndarray, is_target: np.ndarray):
    """Megatron's convention: position t is trained to predict tokens[t + 1] (inside a branch)."""
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(is_target[1:], tokens[1:], IGNORE)
    return labels


def separate_sample(row: PreferenceRow, positions: np.ndarray, seq_length: int,
                    pad_token: int) -> Dict[str, np.ndarray]:
    packed = _Row()
    for k, branch in enumerate(branches(row, positions)):
        tokens, targets = branch["input_ids"], branch["labels"] != IGNORE
        labels = _next_token_labels(tokens, targets)
        packed.add(tokens, labels, branch["position_ids"], k, 0,
                   np.where(labels != IGNORE, k, -1))
    return packed.finish(seq_length, pad_token, pad_document=len(row.answers))


def shared_prefix_sample(row: PreferenceRow, positions: np.ndarray, seq_length: int,
                         pad_token: int) -> Dict[str, np.ndarray]:
    packed = _Row()
    shared = len(row.prompt) - 1
    packed.add(row.prompt[:shared], np.full(shared, IGNORE), positions[:shared], 0, 0,
               np.full(shared, -1))
    for k, answer in enumerate(row.answers):
        tokens = np.concatenate([row.prompt[-1:], answer])
        labels = np.append(answer, IGNORE)
        branch_positions = positions[-1] + np.arange(len(tokens))
        packed.add(tokens, labels, branch_positions, 0, k + 1, np.where(labels != IGNORE, k, -1))
    return packed.finish(seq_length, pad_token, pad_document=1)


def build_sample(row: PreferenceRow, positions: np.ndarray, layout: str, seq_length: int,
                 pad_token: int) -> Dict[str, np.ndarray]:
    if layout == "separate":
        return separate_sample(row, positions, seq_length, pad_token)
    if layout == "shared-prefix":
        return shared_prefix_sample(row, positions, seq_length, pad_token)
    raise UserError(f"--preference-packing {layout!r}: expected one of {LAYOUTS}")


# ------------------------------------------------------------------------------------------------
# The dataset training reads
# ------------------------------------------------------------------------------------------------

def blend_assignment(weights: Sequence[float], num_samples: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, samples per dataset): sample i goes to the dataset furthest
    behind its share (Megatron's blending rule), so any prefix of the samples follows the
    weights as closely as whole samples can."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    counts = np.zeros(len(shares), dtype=np.int64)
    sources = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        k = int(np.argmax(shares * (i + 1) - counts))
        sources[i] = k
        counts[k] += 1
    return sources, counts


def split_rows(num_rows: int, split: str) -> List[np.ndarray]:
    """Row indices of the train / valid / test parts of ``--split`` (Megatron's rounding)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    parts = []
    for bookends in convert_split_vector_to_split_matrix(parse_and_normalize_split(split)):
        if bookends is None:
            parts.append(np.empty(0, dtype=np.int64))
        else:
            parts.append(np.arange(int(round(bookends[0] * num_rows)),
                                   int(round(bookends[1] * num_rows))))
    return parts


class PreferenceDataset:
    """``num_samples`` samples over ``rows`` (a split), reshuffled every epoch.

    Sample i is row ``order(epoch)[i % n]`` with epoch = i // n: a pure function of (seed, i), so
    resuming needs no loader state. Every row of the split is checked against ``--seq-length``
    up front: a row that does not fit is an error, never a silent truncation.
    """

    def __init__(self, data: PreferenceRows, rows: np.ndarray, num_samples: int,
                 config: PreferenceConfig, split_name: str):
        self.data, self.rows, self.config = data, np.asarray(rows, dtype=np.int64), config
        self.num_samples = int(num_samples)
        # Keyed by what the split holds, not where the files live: a copied dataset reshuffles
        # and places positions the same way.
        self.stream = zlib.crc32(f"{split_name}:{self.rows[:1].tolist()}:{len(self.rows)}".encode())
        if len(self.rows) == 0:
            raise ValueError(f"the {split_name} split of {data.prefix} has no rows")
        self._check_rows(split_name)

    def _check_rows(self, split_name: str) -> None:
        config = self.config
        answers = self.data.answers_per_row()[self.rows] - 1
        if answers.min() < config.num_rejected:
            row = int(self.rows[np.argmin(answers)])
            raise UserError(f"--num-rejected {config.num_rejected}: row {row} of {self.data.prefix}"
                             f" has only {int(answers.min())} rejected answers")
        needed = np.array([layout_length(*self.data.lengths(int(r), config.num_rejected),
                                         config.layout) for r in self.rows])
        if needed.max() > config.seq_length:
            worst = int(self.rows[np.argmax(needed)])
            too_long = int((needed > config.seq_length).sum())
            shared = ", use --preference-packing shared-prefix" if config.layout == "separate" else ""
            raise UserError(
                f"{too_long} of {len(self.rows)} {split_name} rows of {self.data.prefix} do not fit "
                f"--seq-length {config.seq_length} in the {config.layout} layout (row {worst} needs "
                f"{int(needed.max())} tokens); raise --seq-length{shared}, or preprocess with a "
                f"smaller --max-answer-tokens / --max-prompt-tokens")

    def __len__(self) -> int:
        return self.num_samples

    def row_of(self, index: int) -> int:
        epoch, offset = divmod(int(index), len(self.rows))
        order = np.random.default_rng([self.config.seed, self.stream, epoch]).permutation(len(self.rows))
        return int(self.rows[order[offset]])

    def branches(self, index: int) -> List[Dict[str, np.ndarray]]:
        """Sample ``index`` as 1 + M separate sequences (what tools/inspect_batches.py dumps)."""
        row = self.data.row(self.row_of(index), self.config.num_rejected)
        return branches(row, self._positions(row, index))

    def _positions(self, row: PreferenceRow, index: int) -> np.ndarray:
        rng = position_schemes.sample_rng(self.config.seed, self.stream, int(index))
        return prompt_positions(row, self.config.position_scheme,
                                self.config.target_seq_length, rng)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        row_index = self.row_of(index)
        row = self.data.row(row_index, self.config.num_rejected)
        sample = build_sample(row, self._positions(row, index), self.config.layout,
                              self.config.seq_length, self.config.pad_token)
        # Which row of the dataset this is: offline reference log-probs are looked up by it.
        sample["row"] = np.array(row_index, dtype=np.int64)
        return sample


class BlendedPreferenceDataset:
    """Several preference datasets mixed by weight: sample i is the next unread sample of the
    dataset ``sources[i]`` (``blend_assignment``); each part keeps its own order and positions."""

    def __init__(self, parts: Sequence[PreferenceDataset], sources: np.ndarray, num_samples: int):
        self.parts, self.sources = list(parts), np.asarray(sources, dtype=np.int64)
        self.num_samples = int(num_samples)
        # Sample i's index inside its part: how many earlier samples went to the same part.
        self.offsets = np.zeros(len(self.sources), dtype=np.int64)
        seen = np.zeros(len(self.parts), dtype=np.int64)
        for i, k in enumerate(self.sources):
            self.offsets[i], seen[k] = seen[k], seen[k] + 1

    def __len__(self) -> int:
        return self.num_samples

    def _locate(self, index: int) -> Tuple[PreferenceDataset, int]:
        return self.parts[int(self.sources[index])], int(self.offsets[index])

    def dataset_of(self, index: int) -> str:
        return self._locate(index)[0].data.prefix

    def row_of(self, index: int) -> int:
        part, offset = self._locate(index)
        return part.row_of(offset)

    def branches(self, index: int) -> List[Dict[str, np.ndarray]]:
        part, offset = self._locate(index)
        return part.branches(offset)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        part, offset = self._locate(index)
        return part[offset]
