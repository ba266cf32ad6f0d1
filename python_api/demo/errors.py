"""How the demo reports bad input: one line on stderr, prefixed with the program's name,
and exit code 2, never a traceback (the command-line tool's contract; see cli.main)."""

from __future__ import annotations

PROG = "sam-demo"
EXIT_USAGE = 2


class DemoError(Exception):
    """Bad input: reported as one line on stderr with exit code 2 (never a traceback)."""
