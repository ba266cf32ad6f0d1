"""A section that exercises the runner's failure handling (used by the tests only).

``python -m benchmarks.run --smoke --sections selftest``: an item that works, one that raises,
one that kills its process (as a kernel fault would), one that hangs, and one after them that
must still run.
"""

from __future__ import annotations

import os
import signal
import time

from benchmarks.common import Item, Skip


def _raise() -> dict:
    raise RuntimeError("planned failure")


def _crash() -> dict:
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}


def _hang() -> dict:
    time.sleep(3600)
    return {}


def _skip() -> dict:
    raise Skip("planned skip")


def plan(cfg: dict) -> list[Item]:
    return [
        Item("selftest/ok", "selftest", lambda: {"value": 1}),
        Item("selftest/raise", "selftest", _raise),
        Item("selftest/skip", "selftest", _skip),
        Item("selftest/crash", "selftest", _crash),
        Item("selftest/hang", "selftest", _hang),
        Item("selftest/after", "selftest", lambda: {"value": 2}),
    ]
