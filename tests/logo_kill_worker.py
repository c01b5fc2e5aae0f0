"""Run `tools/build_logo_data.py`, then SIGKILL itself mid-file (for the resume test).

    python tests/logo_kill_worker.py KILL_AFTER_WRITES --input ... --output ... --model ...

After KILL_AFTER_WRITES rows have been written (output and dropped-rows files together), it writes
the first half of the next row (a torn last line, as a crash during a write leaves) and kills its
own process with SIGKILL: no Python cleanup, no flush at exit, like an OOM kill or a preemption.
"""

import os
import signal
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

import build_logo_data  # noqa: E402

from megatron_ext.selection.ladm import scores_io  # noqa: E402


def main() -> None:
    kill_after = int(sys.argv[1])
    real_write = scores_io.ScoreWriter.write
    writes = 0

    def write_then_die(self, rows):
        nonlocal writes
        if writes == kill_after:
            text = "".join(scores_io.json.dumps(row) + "\n" for row in rows)
            self._file.write(text[:len(text) // 2])
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, rows)
        writes += 1

    scores_io.ScoreWriter.write = write_then_die
    sys.exit(build_logo_data.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
