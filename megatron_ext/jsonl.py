"""JSON-lines input and append-only output, one way for every tool.

Reading: ``parse_object(line, where, error)`` turns one line into a dict or raises the caller's
error type with ``FILE:LINE``-style context, so every tool reports bad input in the same words.

Writing resumable output (LADM scores, LOGO answers): rows are appended and flushed per batch by
``AppendWriter``; after a kill, ``recover_appended`` reads back the complete rows and cuts off a
last line the kill left half-written, so appended rows start on a fresh line.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, List, Tuple

# error(message, kind) -> an exception; kind is "json" (not JSON) or "object" (not an object).
ErrorFactory = Callable[[str, str], Exception]


def parse_object(line, where: str, error: ErrorFactory, expected: str = "a JSON object") -> dict:
    """One JSON line as a dict; ``expected`` describes the object in the message."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno})", "json") from None
    if not isinstance(row, dict):
        raise error(f"{where}: expected {expected}, got {type(row).__name__}", "object")
    return row


def recover_appended(path: str, accept: Callable[[dict, int], None],
                     damaged: Callable[[int], Exception]) -> Tuple[List[dict], int]:
    """(complete rows of ``path``, bytes of a torn last line dropped from it).

    ``accept(row, line_number)`` raises for a row this run cannot continue from (other settings);
    ``damaged(line_number)`` is raised for an unreadable line before the last one. The file is
    truncated after its last complete row (and a lost final newline restored).
    """
    rows: List[dict] = []
    if not os.path.exists(path):
        return rows, 0
    kept_bytes, dropped, lost_newline = 0, 0, False
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except ValueError:
                if not line.endswith(b"\n"):  # the last line, cut short by a kill
                    dropped = len(line)
                    break
                raise damaged(number) from None
            accept(row, number)
            rows.append(row)
            kept_bytes += len(line)
            lost_newline = not line.endswith(b"\n")  # a whole last row, only its newline lost
    if dropped or lost_newline:
        with open(path, "r+b") as f:
            f.truncate(kept_bytes)
            if lost_newline:
                f.seek(kept_bytes)
                f.write(b"\n")
    return rows, dropped


class AppendWriter:
    """Appends rows to a JSON-lines file, one flush per batch (a kill loses at most one batch)."""

    def __init__(self, path: str):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, rows: Iterable[dict]) -> None:
        self._file.write("".join(json.dumps(row) + "\n" for row in rows))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AppendWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(path: str, error: ErrorFactory, skip_blank: bool = True,
              expected: str = "a JSON object") -> Iterable[Tuple[int, dict]]:
    """(line number, row) for every line of ``path``; bad lines raise ``error`` with PATH:LINE."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if skip_blank and not line.strip():
                continue
            yield number, parse_object(line, f"{path}:{number}", error, expected)


__all__ = ["AppendWriter", "parse_object", "read_rows", "recover_appended"]
