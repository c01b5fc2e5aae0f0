"""Where training numbers go: a Megatron-LM style log line, a JSONL file and TensorBoard."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional


class MetricsWriter:
    """Writes on the rank given ``enabled`` (rank 0); a no-op elsewhere."""

    def __init__(self, enabled: bool, jsonl_path: Optional[str], tensorboard_dir: Optional[str]):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=10)

    def record(self, record: dict, step: int, prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "kind"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()

    def log(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
