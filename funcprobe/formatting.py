"""Numbers for people: one formatter for every table funcprobe prints.

``fmt(value, spec)`` writes None as "—", NaN as "n/a", infinities as "inf"/"-inf", and never a negative zero: a value
that rounds to zero in the chosen format prints without its sign ("0", "0.000", not "-0" or "-0.000"), so a table
never suggests a direction that the digits do not show.
"""

from __future__ import annotations

import math
import re

__all__ = ["fmt"]

_WIDTH = re.compile(r"^([<>^=]?)(\d*)")


def fmt(value, spec: str = ".6g") -> str:
    """``format(value, spec)`` for a table (see the module docstring); "—" and "n/a" keep the spec's width and
    alignment, so columns stay aligned."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        align, width = _WIDTH.match(spec).groups()
        return format("—" if value is None else "n/a", f"{align or '>'}{width}" if width else "")
    value = float(value)
    text = format(value, spec)
    if text.lstrip().startswith("-") and float(text) == 0:
        text = text.replace("-", "", 1)
    return text
