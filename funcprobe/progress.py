"""Progress bars for long loops: tqdm when asked for, and by default only when stderr is a terminal.

Every long-running function takes ``progress: bool | None``: True shows a bar, False never, None (the command
line's default) only when stderr is a terminal — so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable, *, total: int, desc: str, enabled: bool | None) -> Iterable:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (None: only when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)
