"""The evaluation tasks and how each is scored; one entry point for the CLI and the training hook.

    ppl-by-position            see ppl_by_position.py
    passkey, niah,             haystacks from haystack.py; exact match of greedy decoding of
    niah-multikey              the answer tokens (no sampling)

A needle sample is correct when greedy decoding reproduces every answer token. With the answer at
the end of the sequence that takes one forward pass: greedy decoding emits the gold answer exactly
when the argmax at each answer position, given the gold tokens before it, is the gold token; up to
the first mismatch it emits exactly those argmax tokens, which is what ``greedy`` records.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from megatron_ext.evaluate import ppl_by_position
from megatron_ext.evaluate.haystack import NEEDLE_TASKS, HaystackBuilder
from megatron_ext.errors import UserError

PPL_TASK = "ppl-by-position"
TASKS = (PPL_TASK,) + NEEDLE_TASKS
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclasses.dataclass
class EvalConfig:
    tasks: List[str]
    lengths: List[int]
    depths: List[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_DEPTHS))
    num_samples: int = 10
    seed: int = 1234
    bucket_size: Optional[int] = None
    chat_template: bool = False

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise UserError(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if not self.tasks:
            raise UserError(f"--tasks is empty; choose from {', '.join(TASKS)}")
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise UserError(f"--lengths must be positive token counts >= 2, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise UserError(f"--depths must be fractions in [0, 1], got {self.depths}")
        for flag, values in (("--tasks", self.tasks), ("--lengths", self.lengths),
                             ("--depths", self.depths)):
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ValueError(f"{flag} lists {', '.join(map(str, repeated))} more than once")
        if self.num_samples < 1:
            raise UserError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.bucket_size is None:
            self.bucket_size = ppl_by_position.default_bucket_size(self.lengths)
        if self.bucket_size < 1:
            raise UserError(f"--bucket-size must be >= 1, got {self.bucket_size}")


def run_needle_task(runner, builder: HaystackBuilder, tokenizer, task: str, lengths: Sequence[int],
                    depths: Sequence[float], num_samples: int,
                    progress_factory: Optional[ProgressFactory] = None) -> Dict[str, dict]:
    """``{str(L): {"accuracy": ..., "correct": ..., "by_depth": {...}, "samples": [...]}}``."""
    out = {}
    for length in lengths:
        samples = builder.build_all(task, length, depths, num_samples)
        progress = progress_factory(f"{task} {length}", len(samples)) if progress_factory else None
        answers = runner.greedy_answers([s.tokens for s in samples],
                                        [s.answer_start for s in samples], progress)
        records = [score(sample, predicted, losses, tokenizer)
                   for sample, (predicted, losses) in zip(samples, answers, strict=True)]
        by_depth = {}
        for depth in depths:
            hits = [r["correct"] for r in records if r["depth"] == depth]
            by_depth[_depth_key(depth)] = {"accuracy": float(np.mean(hits)), "correct": int(sum(hits)),
                                           "samples": len(hits)}
        correct = sum(r["correct"] for r in records)
        out[str(length)] = {
            "accuracy": correct / len(records), "correct": int(correct), "samples": len(records),
            "answer_loss": float(np.mean([r["answer_loss"] for r in records])),
            "by_depth": by_depth, "per_sample": records,
        }
    return out


def score(sample, predicted: np.ndarray, losses: np.ndarray, tokenizer) -> dict:
    """One sample's record: exact match, what greedy decoding emits, and where the needle was."""
    gold = sample.answer_tokens
    mismatch = np.nonzero(predicted != gold)[0]
    # Greedy decoding's output: the argmax tokens up to and including the first wrong one.
    greedy = predicted[:mismatch[0] + 1] if len(mismatch) else predicted
    return {
        "depth": sample.depth, "index": sample.index, "correct": bool(len(mismatch) == 0),
        "expected": sample.answer, "greedy": tokenizer.detokenize(greedy.tolist()),
        "greedy_tokens": [int(t) for t in greedy],
        "answer_loss": float(np.mean(losses)),
        "needle_start": int(sample.needle_start), "actual_depth": round(sample.actual_depth, 4),
        "filler_source": list(sample.filler_source),
    }


def _depth_key(depth: float) -> str:
    return f"{depth:g}"


def run_tasks(runner, corpus, tokenizer, config: EvalConfig,
              progress_factory: Optional[ProgressFactory] = None) -> Dict[str, dict]:
    """``{"tasks": {TASK: {LENGTH: {...}}}}`` for every task of ``config``."""
    results: Dict[str, dict] = {}
    builder = None
    for task in config.tasks:
        if task == PPL_TASK:
            results[task] = ppl_by_position.run(runner, corpus, config.lengths, config.num_samples,
                                                config.bucket_size, progress_factory)
            continue
        if builder is None:
            builder = HaystackBuilder(corpus, tokenizer, config.seed, config.chat_template)
        results[task] = run_needle_task(runner, builder, tokenizer, task, config.lengths,
                                        config.depths, config.num_samples, progress_factory)
    return {"tasks": results}


def flat_metrics(results: Dict[str, dict]) -> Dict[str, float]:
    """``{"passkey/1024": accuracy, "ppl-by-position/1024": loss, ...}`` for logging."""
    flat = {}
    for task, by_length in results["tasks"].items():
        for length, numbers in by_length.items():
            value = numbers.get("accuracy", numbers.get("loss"))
            if value is not None:
                flat[f"{task}/{length}"] = float(value)
    return flat
