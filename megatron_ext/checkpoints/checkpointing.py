"""Checkpoints with Megatron-Core dist_checkpointing (torch_dist format), Megatron-LM's layout:

    SAVE/iter_0000100/            model + optimizer shards, common.pt, metadata
    SAVE/iter_0000100/model_args.json
    SAVE/latest_checkpointed_iteration.txt

Atomic: shards go to ``iter_XXXXXXX.tmp``, which is renamed once every rank has written, and the
tracker file is replaced last. A crash mid-save leaves the previous checkpoint as the latest.
``--async-save`` writes the shards from a forked process per rank and runs the same rename and
tracker steps when all of them have finished.
Sharded tensors carry global shapes, so a checkpoint saved under one TP/PP layout loads under
another. Resume restores iteration, data position (consumed samples), optimizer, LR schedule and,
when the layout is unchanged, every rank's RNG state.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_ext.config import (ARCHITECTURE_FIELDS, EXTENSION_FIELDS, CheckpointConfig,
                                 ModelConfig)
from megatron_ext.checkpoints import publish
from megatron_ext.parallel import device_platform
from megatron_ext.errors import UserError
from megatron_ext.model.rope_scaling import ROPE_FIELDS

TRACKER_FILE = publish.TRACKER_FILE
FORMAT_VERSION = 1



class CheckpointError(UserError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[str]:
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def checkpoint_dir_to_load(root: str) -> Tuple[str, Optional[int]]:
    """(directory, iteration) of the latest checkpoint under ``root``; 'release' has no iteration."""
    tag = read_tracker(root)
    if tag is None:
        raise CheckpointError(f"--load {root}: no {TRACKER_FILE} found; is this a checkpoint "
                              "directory written by megatron_ext (or tools/convert_checkpoint.py)?")
    if tag == "release":
        return os.path.join(root, "release"), None
    try:
        iteration = int(tag)
    except ValueError:
        raise CheckpointError(f"{os.path.join(root, TRACKER_FILE)} holds {tag!r}, expected an "
                              "iteration number or 'release'") from None
    ckpt_dir = iteration_dir(root, iteration)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(
            f"{os.path.join(root, TRACKER_FILE)} names iteration {iteration}, but {ckpt_dir} does "
            "not exist; write the iteration of a complete iter_* directory into the tracker file")
    return ckpt_dir, iteration


def architecture_of(model: ModelConfig) -> dict:
    return {field: getattr(model, field) for field in ARCHITECTURE_FIELDS}


# Recorded beside the architecture, not checked against a run: a context extension changes them.
RECORDED_FIELDS = ("max_position_embeddings", "seq_length",
                   *ROPE_FIELDS)  # every RoPE scaling field: linear, llama3's parameters, YaRN


def model_record(model: ModelConfig) -> dict:
    """What ``model_args.json`` holds: the architecture, the lengths and the RoPE scaling."""
    return architecture_of(model) | {field: getattr(model, field) for field in RECORDED_FIELDS}


# Loading weights only (evaluation, conversion parity): iteration, optimizer and RNG untouched.
WEIGHTS_ONLY = CheckpointConfig(finetune=True, no_load_optim=True, no_load_rng=True)

# How the distributed optimizer lays out its state in a checkpoint. Megatron-Core 0.16's default
# ('fully_sharded_model_space') cannot be saved at all (its flattened ShardedTensors are refused);
# 'fully_reshardable' gathers each DP group's shards into per-parameter tensors shaped like the
# model's, so the state loads under any TP / CP / DP layout that also uses the distributed
# optimizer (the regular optimizer's state is keyed differently: check_optimizer_kind). The
# regular optimizer ignores the setting.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def read_model_args(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, "model_args.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: not a megatron_ext checkpoint")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the checkpoint is damaged: load an "
                              "earlier iter_* directory (edit the tracker file)") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} holds no JSON object; the checkpoint is damaged")
    return record


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_sharded_object() -> ShardedObject:
    """This rank's RNG states, one slot per rank of the (pp, tp, cp, dp) grid."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    layout = _layout()
    shape = (layout["pp"], layout["tp"], layout["cp"], layout["dp"])
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_context_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _restore_rng(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrap(model_chunk):
    return getattr(model_chunk, "module", model_chunk)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save(root: str, iteration: int, model: List[torch.nn.Module], optimizer, scheduler,
         consumed_samples: int, model_config: ModelConfig, tag: Optional[str] = None,
         keep_last: Optional[int] = None, async_queue=None,
         on_published: Optional[Callable[[str], None]] = None) -> str:
    """Write a checkpoint for ``iteration`` atomically; returns its directory. ``keep_last``:
    then remove all but the newest ``keep_last`` iter_* directories (never the tracker's).

    ``async_queue`` (--async-save; a Megatron-Core ``AsyncCallsQueue``): the shards are written
    by a forked writer process per rank while training goes on, and the publication steps (the
    staging directory renamed, the tracker replaced, retention) run as the request's finalize
    step, once every rank's writer has finished - the same sequence as a synchronous save, only
    later, so a run killed while the writers work keeps the previous checkpoint as the latest.
    The caller drives the queue (``maybe_finalize_async_calls``); ``on_published(final_dir)`` runs
    on every rank when the checkpoint is in place.
    """
    final_dir = os.path.join(root, tag) if tag else iteration_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    if _is_rank0():
        publish.start(final_dir)
    _barrier()

    model_sd = _unwrap(model[0]).sharded_state_dict()
    state = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": _layout(),
        "model": model_sd,
        "rng_state": _rng_sharded_object(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()

    def publish_everywhere() -> None:
        # Every rank's shards and Megatron's metadata are complete (its own finalize step ran
        # first and ended in a barrier); only now may the directory get its real name.
        if _is_rank0():
            with open(os.path.join(tmp_dir, "model_args.json"), "w") as f:
                json.dump(model_record(model_config), f, indent=2)
            publish.publish(tmp_dir, final_dir)
            publish.write_tracker(root, tag or str(iteration))
            if keep_last:
                remove_old_checkpoints(root, keep_last)
        _barrier()
        if on_published is not None:
            on_published(final_dir)

    if async_queue is None:
        dist_checkpointing.save(state, tmp_dir)
        _barrier()
        publish_everywhere()
    else:
        request = dist_checkpointing.save(state, tmp_dir, async_sharded_save=True)
        request.add_finalize_fn(publish_everywhere)
        async_queue.schedule_async_request(request)
    return final_dir


def remove_old_checkpoints(root: str, keep_last: int) -> List[str]:
    """--keep-last-n-checkpoints: delete the iter_* directories older than the newest
    ``keep_last``, never the one the tracker names; returns the removed names. Each goes through a
    ``.deleting`` rename first, so a kill mid-delete leaves no half directory under a real name."""
    import re
    import shutil

    for name in os.listdir(root):
        if name.endswith(".deleting"):  # left by a kill during an earlier removal
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    iterations = sorted(int(m.group(1)) for m in (re.fullmatch(r"iter_(\d{7})", name)
                                                  for name in os.listdir(root)) if m)
    tracked = read_tracker(root)
    removed = []
    for iteration in iterations[:-keep_last] if keep_last > 0 else []:
        if tracked == str(iteration):
            continue
        path = iteration_dir(root, iteration)
        os.replace(path, path + ".deleting")
        shutil.rmtree(path + ".deleting", ignore_errors=True)
        removed.append(os.path.basename(path))
    return removed


def embedding_rows(load: Optional[str], tokenizer_vocab_size: int, divisible_by: int,
                   tensor_parallel_size: int) -> int:
    """Padded vocabulary: the tokenizer's, or the checkpoint under ``load``'s when that differs
    (and can serve the tokenizer under this TP size)."""
    from megatron_ext.data.tokenizer import padded_vocab_size

    rows = padded_vocab_size(tokenizer_vocab_size, divisible_by, tensor_parallel_size)
    saved = saved_padded_vocab_size(load) if load else None
    if saved is not None and saved != rows:
        if saved < tokenizer_vocab_size or saved % tensor_parallel_size:
            raise CheckpointError(
                f"--load {load} has {saved} embedding rows, which cannot serve the "
                f"{tokenizer_vocab_size}-token --tokenizer-model under "
                f"--tensor-model-parallel-size {tensor_parallel_size}")
        rows = saved
    return rows


def saved_padded_vocab_size(root: str) -> Optional[int]:
    """The embedding rows of the checkpoint --load would read (None: no checkpoint there).

    Converted Hugging Face models often have more rows than their tokenizer has tokens (Qwen2,
    SmolLM2), so the checkpoint, not the tokenizer, decides the embedding shape.
    """
    if read_tracker(root) is None:
        return None
    ckpt_dir, _ = checkpoint_dir_to_load(root)
    return read_model_args(ckpt_dir).get("padded_vocab_size")


def check_architecture(checkpoint_dir: str, model: ModelConfig, finetune: bool) -> None:
    saved = read_model_args(checkpoint_dir)
    free = EXTENSION_FIELDS if finetune else ()
    mismatched = [
        f"{field}: checkpoint {saved[field]!r} vs run {getattr(model, field)!r}"
        for field in ARCHITECTURE_FIELDS
        if field in saved and saved[field] != getattr(model, field) and field not in free
    ]
    if mismatched:
        flags = ", ".join("--" + m.split(":")[0].replace("_", "-") for m in mismatched)
        raise CheckpointError(f"--load {checkpoint_dir} was written for a different model "
                              f"({'; '.join(mismatched)}); set {flags} to match the checkpoint")


EXTRA_STATE_SUFFIX = "_extra_state"


def drop_absent_extra_states(model_sd: dict, ckpt_dir: str) -> set:
    """Remove from ``model_sd`` the ``*._extra_state`` entries the checkpoint does not hold.

    Transformer Engine modules keep FP8 scaling metadata as ``_extra_state``; a checkpoint written
    with the local spec (CPU training, the converter) has none for modules that only TE's spec
    has (its core attention, for one). Those start from TE's defaults. Returns the dropped keys.
    """
    extra = [k for k in model_sd if k.endswith(EXTRA_STATE_SUFFIX)]
    if not extra:
        return set()
    saved = dist_checkpointing.serialization.load_sharded_metadata(ckpt_dir)
    absent = {k for k in extra if getattr(model_sd[k], "key", k) not in saved}
    for key in absent:
        del model_sd[key]
    return absent


def load_model_state(module: torch.nn.Module, state: dict, absent_extra: set,
                     ckpt_dir: str) -> None:
    """``load_state_dict`` that tolerates exactly the absent extra states and nothing else."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in absent_extra]
    if missing or unexpected:
        raise CheckpointError(f"--load {ckpt_dir} does not fit this model: missing "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{list(unexpected)[:5]}")


def _saved_by_distributed_optimizer(saved) -> bool:
    """Whether a checkpoint's common optimizer entry is the distributed optimizer's (chained
    optimizers keep one entry per index)."""
    if not isinstance(saved, dict):
        return False
    return "param_state_sharding_type" in saved or any(
        _saved_by_distributed_optimizer(v) for k, v in saved.items() if isinstance(k, int))


def check_optimizer_kind(saved, optimizer, ckpt_dir: str) -> None:
    """The distributed and the regular optimizer save their state in formats the other cannot
    read (a KeyError deep in Megatron-Core): refuse the mismatch by flag instead."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    running = any(isinstance(opt, DistributedOptimizer)
                  for opt in getattr(optimizer, "chained_optimizers", [optimizer]))
    stored = _saved_by_distributed_optimizer(saved)
    if running != stored:
        raise CheckpointError(
            f"{ckpt_dir} holds the optimizer state of a run "
            f"{'with' if stored else 'without'} --use-distributed-optimizer, and this run is "
            f"{'with' if running else 'without'} it: resume with the flag as it was saved, or "
            f"add --no-load-optim to load the weights, LR schedule and data position without the "
            f"optimizer state")


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer's torch Adam a (zero) state before it is loaded into.

    Without Apex / Transformer Engine, Megatron-Core's DistributedOptimizer reads the step count
    from the torch optimizer's per-parameter state while it builds the sharded state dict to load
    into; a fresh optimizer has none yet (an assertion). The loaded checkpoint replaces every value
    set here (moments and step alike).
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return  # fused optimizers keep the step in their param groups
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
            continue
        inner = opt.optimizer
        if opt.init_state_fn is not None:
            opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.tensor(0.0))


def load(root: str, model: List[torch.nn.Module], optimizer, scheduler, model_config: ModelConfig,
         options: CheckpointConfig = WEIGHTS_ONLY) -> Tuple[int, int]:
    """Restore from the latest checkpoint under ``root``; returns (iteration, consumed_samples).

    With ``options.finetune`` only the weights are loaded and training starts at iteration 0. Like
    Megatron-LM, a --load directory without any checkpoint starts a fresh run (so --load and --save
    can name the same directory), except with --finetune, where weights are the point.
    """
    if read_tracker(root) is None and not options.finetune:
        return 0, 0  # integrity.find_checkpoint warned at start-up (Megatron-LM's behaviour)
    ckpt_dir, _ = checkpoint_dir_to_load(root)
    check_architecture(ckpt_dir, model_config, options.finetune)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    full_resume = not options.finetune
    same_layout = common.get("layout") == _layout()

    model_sd = _unwrap(model[0]).sharded_state_dict()
    absent_extra = drop_absent_extra_states(model_sd, ckpt_dir)
    request = {"model": model_sd}
    load_optim = full_resume and not options.no_load_optim and "optimizer" in common
    if load_optim:
        check_optimizer_kind(common["optimizer"], optimizer, ckpt_dir)
        _allocate_distributed_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                            metadata=OPTIMIZER_METADATA)
    load_rng = full_resume and not options.no_load_rng and same_layout
    if load_rng:
        request["rng_state"] = _rng_sharded_object()
    state = dist_checkpointing.load(request, ckpt_dir)

    load_model_state(_unwrap(model[0]), state["model"], absent_extra, ckpt_dir)
    if load_optim:
        with device_platform.torch_adam_keeps_its_step(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        _restore_rng(state["rng_state"].data if hasattr(state["rng_state"], "data")
                     else state["rng_state"])
    if not full_resume:
        return 0, 0
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return int(common["iteration"]), int(common["consumed_samples"])
