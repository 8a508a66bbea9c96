"""Amounts of money as people read them: the one formatter of every report and table."""

from __future__ import annotations

import math

__all__ = ["format_usd"]

#: Below this an amount is float noise (a difference of sums), not money: the cheapest priced
#: token costs about a hundred-millionth of a dollar.
_NOISE = 5e-11


def format_usd(value: float | None) -> str:
    """``$1,234.57`` from a dollar up; three significant digits below (``$0.123``, ``$0.0500``,
    ``$0.00000255``), never rounded to ``$0.0000``; ``$0`` for nothing; ``unknown`` for None.
    A negative amount (a saving that is a loss) reads ``-$0.0012``."""
    if value is None:
        return "unknown"
    if abs(value) < _NOISE:
        return "$0"
    sign, amount = ("-" if value < 0 else ""), abs(value)
    rounded = float(f"{amount:.3g}")  # 0.0009996 is $0.00100, 0.9996 is $1.00
    if rounded >= 1:
        return f"{sign}${amount:,.2f}"
    return f"{sign}${rounded:.{2 - math.floor(math.log10(rounded))}f}"
