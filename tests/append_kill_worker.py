"""Run a resumable tool, then SIGKILL itself mid-file (for the resume tests).

    python tests/append_kill_worker.py TOOL KILL_AFTER_WRITES [tool arguments ...]

TOOL is a module in tools/ (ladm_select, build_logo_data). Both append their output through
``megatron_ext.jsonl.AppendWriter``. After KILL_AFTER_WRITES batches have been written, the worker
writes the first half of the next batch (a torn last line, as a crash during a write leaves) and
kills its own process with SIGKILL: no Python cleanup, no flush at exit, exactly like an OOM kill
or a preempted job.
"""

import importlib
import json
import os
import signal
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

from megatron_ext import jsonl  # noqa: E402


def main() -> None:
    tool, kill_after = importlib.import_module(sys.argv[1]), int(sys.argv[2])
    real_write = jsonl.AppendWriter.write
    writes = 0

    def write_then_die(self, rows):
        nonlocal writes
        if writes == kill_after:
            text = "".join(json.dumps(row) + "\n" for row in rows)
            torn = text[:len(text) // 2]
            self._file.write(torn[:-1] if torn.endswith("\n") else torn)
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, rows)
        writes += 1

    jsonl.AppendWriter.write = write_then_die
    sys.exit(tool.main(sys.argv[3:]))


if __name__ == "__main__":
    main()
