"""Is the checkpoint under ``--load`` whole? Checked at start-up, before any training.

In order: the tracker file names an iteration -> its directory exists -> ``model_args.json``
parses -> Megatron-Core's ``metadata.json`` and ``common.pt`` are there -> the torch_dist
``.metadata`` reads -> every ``.distcp`` shard it lists exists and is at least as long as the
bytes it indexes there. Each failure names the file. A ``--load`` directory holding no
checkpoint at all is a warning (Megatron-LM's: a fresh run may name the same --load and --save)
or, with --finetune / --exit-on-missing-checkpoint, an error.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional, Tuple

from megatron_ext.checkpoints.checkpointing import (TRACKER_FILE, CheckpointError,
                                                    checkpoint_dir_to_load, read_model_args,
                                                    read_tracker)

DAMAGED = "the checkpoint is damaged (an interrupted copy?); load an earlier iter_* directory"


def shard_sizes(ckpt_dir: str) -> Dict[str, int]:
    """{shard file: bytes the torch_dist metadata indexes in it}, from ``ckpt_dir/.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(ckpt_dir, ".metadata")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {DAMAGED}")
    try:
        metadata = FileSystemReader(ckpt_dir).read_metadata()
    except Exception as err:  # unpickling a truncated file raises anything
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}): {DAMAGED}") from None
    sizes: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
    return sizes


def check_files(ckpt_dir: str) -> None:
    """Raise CheckpointError naming the first missing or damaged file of ``ckpt_dir``."""
    read_model_args(ckpt_dir)
    for name in ("metadata.json", "common.pt"):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise CheckpointError(f"{os.path.join(ckpt_dir, name)} is missing: {DAMAGED}")
    for name, needed in sorted(shard_sizes(ckpt_dir).items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: {DAMAGED}")
        size = os.path.getsize(path)
        if size < needed:
            raise CheckpointError(f"{path} is truncated ({size} bytes, its metadata indexes "
                                  f"{needed}): {DAMAGED}")


def find_checkpoint(root: str, required: Optional[str] = None) -> Optional[Tuple[str, Optional[int]]]:
    """(directory, iteration) of the whole checkpoint ``--load root`` would read, or None when
    ``root`` holds none (warned on rank 0). ``required``: the flag that makes none an error."""
    if read_tracker(root) is None:
        tracker = os.path.join(root, TRACKER_FILE)
        if required:
            raise CheckpointError(f"--load {root}: no {TRACKER_FILE} there ({tracker}), so no "
                                  f"checkpoint, and {required} needs one; check the path")
        if os.environ.get("RANK", "0") == "0":
            print(f"WARNING: could not find the metadata file {tracker}\n"
                  f"    --load {root} holds no checkpoint: will start from random "
                  "(--exit-on-missing-checkpoint makes this an error)", file=sys.stderr, flush=True)
        return None
    ckpt_dir, iteration = checkpoint_dir_to_load(root)
    check_files(ckpt_dir)
    return ckpt_dir, iteration
