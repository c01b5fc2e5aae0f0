"""Position ids for one training sample: contiguous, PoSE, or LongRecipe's PIT.

Short samples can teach long positions when their position ids are spread over a longer target
window T: the model sees relative distances up to T-1 while paying for n << T tokens. Each scheme
is a pure function of the sample's length (or its segment lengths), T and a numpy Generator, so
the loader can make it deterministic from (seed, sample index) and every TP/CP rank computes the
same ids.

  contiguous  0, 1, ..., n-1.
  pose        PoSE (Zhu et al. 2023): the sample is cut into N chunks of random lengths; chunk i
              is shifted by a skip bias u_i ~ U{u_(i-1) .. T-n}, u_0 = 0, and is contiguous inside.
  longrecipe  LongRecipe's position index transformation (Hu et al. 2024): segments (sentences,
              code lines, documents) stay contiguous and the T-n unused positions are spread over
              the gaps *between* segments as a uniform random composition, so the first id is 0
              and the last is exactly T-1 (the released code computed gaps on unfiltered text and
              covered only ~65% of T).
  logo        LOGO's position synthesis for preference data (Tang et al. 2024): the prompt's head
              (template / system prefix) keeps ids from 0, each context chunk keeps contiguous ids
              at a random offset inside its own equal slot of the window, and the question and
              answers follow the last chunk contiguously. No padding inside the sequence (the
              released builder padded every chunk).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megatron_ext.errors import UserError

SCHEMES = ("contiguous", "pose", "longrecipe", "logo")
# Schemes that spread a sample's ids over a longer window T (the rest keep them contiguous).
SKIP_WISE = ("pose", "longrecipe")


def contiguous(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.int64)


def _check_target(length: int, target_length: int) -> None:
    if length < 1:
        raise ValueError(f"a sample needs at least one token, got {length}")
    if target_length < length:
        raise UserError(f"--target-seq-length {target_length} is shorter than the sample "
                         f"({length} tokens); it must be >= --seq-length")


def _composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``parts`` non-negative integers summing to ``total``, uniform over all such compositions.

    Stars and bars: choose the bar positions among total + parts - 1 slots without replacement.
    """
    if parts == 1:
        return np.array([total], dtype=np.int64)
    bars = rng.choice(total + parts - 1, size=parts - 1, replace=False, shuffle=False)
    bars.sort()
    gaps = np.empty(parts, dtype=np.int64)  # = diff([-1, *bars, total + parts - 1]) - 1
    gaps[0] = bars[0]
    gaps[1:-1] = np.diff(bars) - 1
    gaps[-1] = total + parts - 2 - bars[-1]
    return gaps


def pose(length: int, target_length: int, rng: np.random.Generator, num_chunks: int = 2
         ) -> np.ndarray:
    """PoSE position ids (paper definition; chunk lengths are a random split into positive parts)."""
    _check_target(length, target_length)
    if num_chunks < 1:
        raise UserError(f"--pose-num-chunks must be >= 1, got {num_chunks}")
    chunks = min(num_chunks, length)
    cuts = np.sort(rng.choice(np.arange(1, length), size=chunks - 1, replace=False)) \
        if chunks > 1 else np.empty(0, dtype=np.int64)
    chunk_lengths = np.diff(np.concatenate(([0], cuts, [length])))
    free = target_length - length
    biases = np.zeros(chunks, dtype=np.int64)
    for i in range(1, chunks):  # u_i ~ U{u_(i-1) .. T-n}: non-decreasing, so ids stay increasing
        biases[i] = rng.integers(biases[i - 1], free + 1)
    return np.arange(length, dtype=np.int64) + np.repeat(biases, chunk_lengths)


def _boundaries(segment_ends: np.ndarray) -> np.ndarray:
    """Token indices where a new segment starts (the first token excluded)."""
    return np.flatnonzero(segment_ends[:-1]) + 1


def longrecipe(segment_lengths: Sequence[int], target_length: int, rng: np.random.Generator,
               contiguous_prefix: bool = False) -> np.ndarray:
    """PIT position ids over the final token sequence.

    contiguous_prefix: the released code's detail - the first r ~ U{1..n/2} tokens keep ids 0..r-1
    (a PoSE-like anchor at the start); gaps appear only at segment boundaries after it.
    """
    lengths = np.asarray(segment_lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0 or (lengths <= 0).any():
        raise ValueError(f"segment lengths must be positive, got {lengths.tolist()}")
    return _longrecipe(np.cumsum(lengths)[:-1], int(lengths.sum()), target_length, rng,
                       contiguous_prefix)


def _longrecipe(boundaries: np.ndarray, length: int, target_length: int,
                rng: np.random.Generator, contiguous_prefix: bool) -> np.ndarray:
    _check_target(length, target_length)
    if contiguous_prefix and length > 1:
        prefix = int(rng.integers(1, length // 2 + 1))
        boundaries = boundaries[boundaries >= prefix]
    positions = np.arange(length, dtype=np.int64)
    if len(boundaries) == 0:
        # One segment: there is no sentence gap to open, so it stays contiguous.
        return positions
    gaps = _composition(target_length - length, len(boundaries), rng)
    shift = np.zeros(length, dtype=np.int64)
    shift[boundaries] = gaps
    positions += np.cumsum(shift)
    return positions


def logo(segment_lengths: Sequence[int], answer_length: int, target_length: int,
         rng: np.random.Generator) -> np.ndarray:
    """Position ids of a preference prompt ``[head, chunk_1 .. chunk_n, question]``.

    The answers (at most ``answer_length`` tokens) continue after the last prompt id, so every id
    stays below ``target_length``. The head starts at 0 (models always saw their BOS / system
    prompt there); the window between the head and the question-and-answer tail is cut into n equal
    slots and chunk i lies at a uniformly random offset inside slot i, so chunks keep their order,
    never overlap and jump between each other. Fewer than three segments: contiguous ids.
    """
    lengths = np.asarray(segment_lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0 or (lengths <= 0).any():
        raise ValueError(f"segment lengths must be positive, got {lengths.tolist()}")
    total = int(lengths.sum())
    _check_target(total + answer_length, target_length)
    positions = np.arange(total, dtype=np.int64)
    if len(lengths) < 3:
        return positions
    head, chunks, question = int(lengths[0]), lengths[1:-1], int(lengths[-1])
    slot = (target_length - head - question - answer_length) // len(chunks)
    if chunks.max() > slot:
        raise UserError(
            f"a context chunk of {int(chunks.max())} tokens does not fit its slot of {slot} "
            f"positions ({len(chunks)} chunks, {question}-token question, answers up to "
            f"{answer_length} tokens in a {target_length}-position window): raise "
            f"--target-seq-length or preprocess with a smaller --context-chunk-tokens")
    offsets = rng.integers(0, slot - chunks + 1)  # one draw per chunk, each in its own slot
    starts = head + slot * np.arange(len(chunks)) + offsets
    chunk_ends = np.cumsum(lengths)[:-1]
    positions[head:chunk_ends[-1]] = np.concatenate(
        [start + np.arange(n) for start, n in zip(starts, chunks)])
    last = positions[chunk_ends[-1] - 1]
    positions[chunk_ends[-1]:] = last + 1 + np.arange(question)
    return positions


def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator for one sample: a pure function of (seed, dataset stream, sample index).

    Philox is counter-based: (seed, stream) is the key and the sample index the counter, so every
    sample gets an independent stream without hashing a seed sequence per sample (the loader
    calls this once per sample).
    """
    key = ((seed & 0xFFFFFFFF) << 32) | (stream & 0xFFFFFFFF)
    return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, index & (2**64 - 1), 0]))


def position_ids(scheme: str, target_length: int, rng: Optional[np.random.Generator],
                 length: int, segment_ends: Optional[np.ndarray] = None, pose_num_chunks: int = 2,
                 longrecipe_contiguous_prefix: bool = False) -> np.ndarray:
    """Dispatch by ``--position-scheme``; ``segment_ends`` is required for longrecipe."""
    if scheme == "contiguous":
        return contiguous(length)
    if scheme == "pose":
        return pose(length, target_length, rng, pose_num_chunks)
    if scheme == "longrecipe":
        if segment_ends is None:
            raise UserError("--position-scheme longrecipe needs segment boundaries")
        return _longrecipe(_boundaries(segment_ends), length, target_length, rng,
                           longrecipe_contiguous_prefix)
    raise UserError(f"--position-scheme {scheme!r}: expected one of {SCHEMES}")
