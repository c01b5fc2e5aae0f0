"""Run `tools/ladm_select.py score`, then SIGKILL itself mid-file (for the resume test).

    python tests/ladm_kill_worker.py KILL_AFTER_WRITES score --model ... --output ...

After KILL_AFTER_WRITES row batches have been written, it writes the first half of the next batch
(a torn last line, as a crash during a write leaves) and kills its own process with SIGKILL: no
Python cleanup, no flush at exit, exactly like an OOM kill or a preempted job.
"""

import os
import signal
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

import ladm_select  # noqa: E402

from megatron_ext.selection.ladm import scores_io  # noqa: E402


def main() -> None:
    kill_after = int(sys.argv[1])
    real_write = scores_io.ScoreWriter.write
    writes = 0

    def write_then_die(self, rows):
        nonlocal writes
        if writes == kill_after:
            text = "".join(scores_io.json.dumps(row) + "\n" for row in rows)
            torn = text[:len(text) // 2]
            self._file.write(torn[:-1] if torn.endswith("\n") else torn)
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, rows)
        writes += 1

    scores_io.ScoreWriter.write = write_then_die
    sys.exit(ladm_select.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
