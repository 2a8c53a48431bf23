"""Progress bars for long loops: tqdm when asked for, and by default only when stderr is a terminal.

Every long-running function takes ``progress: bool | None``: True shows a bar, False never, None (the command
line's default) only when stderr is a terminal — so logs and pipes stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable

__all__ = ["progress_bar", "library_bars"]


def progress_bar(iterable: Iterable, *, total: int, desc: str, enabled: bool | None) -> Iterable:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (None: only when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


@contextlib.contextmanager
def library_bars(enabled: bool):
    """transformers' and huggingface_hub's own progress bars (weight loading, downloads) on or off, restored after."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    transformers_was_on = hf_logging.is_progress_bar_enabled()
    hub_was_on = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            hf_logging.enable_progress_bar()
        if hub_was_on:
            hub_utils.enable_progress_bars()
