"""``megatron_ext.train`` that SIGKILLs itself at a named point of one checkpoint save.

    python tests/ckpt_kill_worker.py POINT ITERATION TRAINING FLAGS...

The library is not changed: this worker wraps the functions a save goes through and dies inside
the save of ``ITERATION``, at POINT:

    staged    the staging directory exists, nothing written yet (after publish.start)
    shards    the shards are being written: dist_checkpointing.save returned, one .distcp is cut
              to half its length, then the process dies (a kill while the writers still ran);
              with --async-save: the forked writers were started and one shard file exists
    rename    every file is staged, the rename into place has not happened (before publish.publish)
    tracker   the directory is in place, the tracker still names the previous one (before
              publish.write_tracker)

It prints ``KILLED AT POINT`` before dying, so the test knows the point was reached.
"""

import glob
import os
import signal
import sys
import time

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_ext import train
from megatron_ext.checkpoints import publish

POINTS = ("staged", "shards", "rename", "tracker")


def die(point: str) -> None:
    print(f"KILLED AT {point}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def is_target(path: str, iteration: int) -> bool:
    return os.path.basename(path.rstrip("/")).startswith(f"iter_{iteration:07d}")


def install(point: str, iteration: int) -> None:
    originals = {name: getattr(publish, name) for name in ("start", "publish", "write_tracker")}
    save = dist_checkpointing.save

    def start(final_dir):
        tmp = originals["start"](final_dir)
        if point == "staged" and is_target(final_dir, iteration):
            die(point)
        return tmp

    schedule = AsyncCallsQueue.schedule_async_request
    target_dirs = []

    def schedule_async(queue, request):
        call = schedule(queue, request)
        if target_dirs:  # the writers of the target save run now: die while they write
            deadline = time.time() + 60
            while not glob.glob(os.path.join(target_dirs[0], "*.distcp")) and time.time() < deadline:
                time.sleep(0.01)
            die(point)
        return call

    def dist_save(state, ckpt_dir, *args, **kwargs):
        result = save(state, ckpt_dir, *args, **kwargs)
        if result is not None:  # --async-save: nothing written yet, the queue starts the writers
            if point == "shards" and is_target(ckpt_dir, iteration):
                target_dirs.append(ckpt_dir)
            return result
        if point == "shards" and is_target(ckpt_dir, iteration):
            shard = sorted(glob.glob(os.path.join(ckpt_dir, "*.distcp")))[0]
            os.truncate(shard, os.path.getsize(shard) // 2)
            die(point)
        return result

    def publish_dir(tmp_dir, final_dir):
        if point == "rename" and is_target(final_dir, iteration):
            die(point)
        return originals["publish"](tmp_dir, final_dir)

    def write_tracker(root, tag):
        if point == "tracker" and tag == str(iteration):
            die(point)
        return originals["write_tracker"](root, tag)

    publish.start, publish.publish, publish.write_tracker = start, publish_dir, write_tracker
    dist_checkpointing.save = dist_save
    AsyncCallsQueue.schedule_async_request = schedule_async


if __name__ == "__main__":
    point, iteration, *flags = sys.argv[1:]
    assert point in POINTS, point
    install(point, int(iteration))
    sys.exit(train.main(flags))
