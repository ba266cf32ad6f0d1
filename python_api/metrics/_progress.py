"""The optional tqdm progress bar of a long loop (batches, probes, iterations, examples)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

try:  # optional dependency: no progress bar without it
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - exercised only where tqdm is absent
    _tqdm = None


@contextlib.contextmanager
def progress_bar(
    progress: bool | None, total: int | None, desc: str
) -> Iterator[Callable[[], None]]:
    """Yield ``tick()``, which advances the bar by one; the bar is closed however the loop ends.

    ``progress=None`` shows it only on a terminal (tqdm's ``disable=None``), ``False`` never,
    ``True`` always; without tqdm ``tick`` does nothing.
    """
    if progress is False or _tqdm is None:
        yield lambda: None
        return
    bar = _tqdm(total=total, desc=desc, leave=False, disable=None if progress is None else False)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
