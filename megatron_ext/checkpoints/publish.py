"""Atomic publication of a checkpoint directory: readers see the old one or the new one, whole.

    tmp = start(final_dir)         # an empty FINAL.tmp next to the final name
    ... write every file into tmp ...
    publish(tmp, final_dir)        # rename into place (an existing FINAL is swapped out first)
    write_tracker(root, "100")     # the tracker file is replaced last

A process killed before ``publish`` leaves only ``FINAL.tmp`` (removed by the next ``start``);
one killed before ``write_tracker`` leaves the tracker naming the previous checkpoint. The
training saver (``checkpointing.save``) and the converter's writer (``convert/megatron_ckpt``)
both go through here, so they cannot disagree on what a complete checkpoint is.
"""

from __future__ import annotations

import os
import shutil

TRACKER_FILE = "latest_checkpointed_iteration.txt"


def start(final_dir: str) -> str:
    """A fresh, empty staging directory for ``final_dir``; returns its path."""
    tmp_dir = final_dir + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(final_dir)), exist_ok=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    return tmp_dir


def publish(tmp_dir: str, final_dir: str) -> None:
    """Move the finished staging directory to ``final_dir``, replacing any previous one."""
    if os.path.exists(final_dir):
        # Re-saving an iteration (after a resume): swap in the new one, then drop the old.
        stale = final_dir + ".old"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final_dir, stale)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def write_tracker(root: str, tag: str) -> None:
    """Point ``root``'s tracker file at ``tag`` (an iteration number or 'release'), durably."""
    tracker_tmp = os.path.join(root, TRACKER_FILE + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER_FILE))
