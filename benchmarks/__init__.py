"""Benchmarks: each script prints one JSON line ``{"benchmark", "ratio", "goal", "device", ...}``
against the fairest baseline, measured in the same run (results in RESULTS.md).

This file holds the one thing they share: how the machine is named in the ``device`` field.
"""

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
