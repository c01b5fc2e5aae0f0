"""Training objectives as plug-ins: language modelling, SFT and preference alignment.

An objective brings everything that differs between them, so the trainer never branches on which
one runs:

* ``validate(args)``: its flag rules and defaults, called once on the parsed namespace while the
  flags are read (``arguments.finalize``), the only place configuration is filled in;
* ``config(args)``: its frozen ``ObjectiveConfig`` (the name, and its own options if it has flags);
* ``datasets(cfg, tokenizer, num_samples)``: [train, valid, test] datasets (None where unread),
  from the frozen ``RunConfig``;
* ``build(cfg, device)``: the per-micro-batch strategy Megatron-Core's schedule calls, with
  ``forward_step(data_iterator, model)``, ``loss_key`` and the extra ``metrics`` it reports.

``get(name)`` returns the registered objective; ``NAMES`` lists them for ``--objective``.
"""

from __future__ import annotations

from typing import Dict, List, Protocol

from megatron_ext.config import ObjectiveConfig, RunConfig


class Objective(Protocol):
    name: str

    def validate(self, args) -> None: ...

    def config(self, args) -> ObjectiveConfig: ...

    def datasets(self, cfg: RunConfig, tokenizer, num_samples: List[int]) -> list: ...

    def build(self, cfg: RunConfig, device): ...


def _registry() -> Dict[str, Objective]:
    from megatron_ext.objectives.language_model import LanguageModeling
    from megatron_ext.objectives.preference import PreferenceAlignment

    return {objective.name: objective for objective in (
        LanguageModeling("pretrain"), LanguageModeling("sft"), PreferenceAlignment())}


NAMES = ("pretrain", "sft", "preference")


def get(name: str) -> Objective:
    registry = _registry()
    if name not in registry:
        from megatron_ext.errors import ArgumentError

        raise ArgumentError(f"--objective {name!r}: expected one of {', '.join(registry)}")
    return registry[name]


def datasets_for(cfg: RunConfig, tokenizer, num_samples: List[int]) -> list:
    """The datasets training reads: the objective's [train, valid, test] (also used by
    ``tools/inspect_batches.py``, so it shows exactly what training reads)."""
    return get(cfg.objective.name).datasets(cfg, tokenizer, num_samples)
