"""Numbers for people: one formatter for every table funcprobe prints.

``fmt(value, spec)`` writes None as "—", NaN as "n/a", infinities as "inf"/"-inf", and never a negative zero: a value
that rounds to zero in the chosen format prints without its sign ("0", "0.000", not "-0" or "-0.000"), so a table
never suggests a direction that the digits do not show.
"""

from __future__ import annotations

import math

__all__ = ["fmt"]


def fmt(value, spec: str = ".6g") -> str:
    """``format(value, spec)`` for a table (see the module docstring)."""
    if value is None:
        return "—"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    text = format(value, spec)
    if text.lstrip().startswith("-") and float(text) == 0:
        text = text.replace("-", "", 1)
    return text
