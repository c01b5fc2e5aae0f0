"""The machine a benchmark ran on, for the ``device`` field of its JSON line."""

import os
import platform


def cpu_description() -> str:
    """``CPU <model name>, <N> cores, no GPU`` (the model name from /proc/cpuinfo where present)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, no GPU"
