"""``--use-checkpoint-args`` (Megatron-LM's): the model's flags come from the checkpoint.

Applied at the edge (``arguments.parse``, ``evaluate.cli.main``), on the parsed namespace before the configuration is frozen: every field
``model_args.json`` records (the architecture, the lengths and the RoPE scaling) that has a flag
takes the checkpoint's value. A flag given explicitly that contradicts an architecture field is
refused, naming it; given lengths and RoPE scaling (and, with --finetune, the RoPE base: a context
extension changes them on purpose) win over the record.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Dict, Optional, Sequence, Set

from megatron_ext.checkpoints import integrity
from megatron_ext.checkpoints.checkpointing import RECORDED_FIELDS, read_model_args
from megatron_ext.config import ARCHITECTURE_FIELDS, EXTENSION_FIELDS
from megatron_ext.errors import ArgumentError


def explicit_dests(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Set[str]:
    """The dests the command line sets itself: a second parse in which no flag has a default."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default, action.required = argparse.SUPPRESS, False
    namespace, _ = bare.parse_known_args(argv)
    return set(vars(namespace))


def overrides(args: argparse.Namespace, explicit: Set[str]) -> Dict[str, Any]:
    """With --use-checkpoint-args, the flag values ``--load``'s model_args.json sets (the edge,
    arguments.py or evaluate/cli.py, puts them into the namespace); refuses contradictions."""
    if not getattr(args, "use_checkpoint_args", False):
        return {}
    if not args.load:
        raise ArgumentError("--use-checkpoint-args reads the model from a checkpoint: give --load")
    ckpt_dir, _ = integrity.find_checkpoint(args.load, required="--use-checkpoint-args")
    record = read_model_args(ckpt_dir)
    values = {}
    free = set(RECORDED_FIELDS) | (set(EXTENSION_FIELDS) if args.finetune else set())
    for field in (*ARCHITECTURE_FIELDS, *RECORDED_FIELDS):
        if field not in record or not hasattr(args, field):
            continue  # padded_vocab_size: the run takes the checkpoint's rows anyway
        saved, given = record[field], getattr(args, field)
        if field in explicit and given != saved:
            if field in free:
                continue
            flag = "--" + field.replace("_", "-")
            raise ArgumentError(
                f"{flag} {given} contradicts the checkpoint ({ckpt_dir}/model_args.json has "
                f"{saved}) while --use-checkpoint-args reads the model from it; drop {flag}")
        if field not in explicit:
            values[field] = saved
    return values
