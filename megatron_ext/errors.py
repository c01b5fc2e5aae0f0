"""The one base class for problems a user can fix by changing flags or input files.

Command-line entry points turn a ``UserError`` into ``prog: error: <message>`` and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad flags or input; the message names the flag or field and the fix."""


class ArgumentError(UserError):
    """An invalid combination of flags; the message names the flags and the fix."""


EXIT_USAGE = 2  # argparse's exit status for bad usage; every command uses it for a UserError


def report(prog: str, err: UserError) -> int:
    """Print ``prog: error: message`` (one line, no traceback) and return the exit status."""
    import sys

    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return EXIT_USAGE
